"""Weight schemes: how one runtime's exporter stores a model's weights, as an object the search reads.

A scheme is declared by the exporter that writes it (``exporters/onnx/schemes.py``, ``vllm/schemes.py``,
``llamacpp/schemes.py``), looked up here by the exporter name a runtime gives in ``Capabilities.exporter``, so nothing
outside runtimes/ and exporters/ asks which runtime it has. Per tensor of the model (:class:`WeightTensor`: the
decoder projections, the output head, the embedding) a scheme says how it is stored (:class:`Storage`: format,
bytes with scales, whether it computes in integers), reproduces that runtime's rounding for the screen
(``fake_quantize``; W8A8 also quantizes activations, ``activation_forward``), refuses shapes it cannot hold before
any work (``fitted``, one line) and names the export options it implies (``export_options``).

The model's tensors come from its config alone (a model on the meta device), so the cost model's bytes and the
screen's rounding read the same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from effideploy.errors import OptionError
from effideploy.registry import Registry

# exporter name (``Capabilities.exporter``) -> the module attribute holding its ``Declaration``
DECLARATIONS = Registry("exporter", {
    "onnx": "effideploy.exporters.onnx.schemes:DECLARATION",
    "vllm": "effideploy.exporters.vllm.schemes:DECLARATION",
    "llamacpp": "effideploy.exporters.llamacpp.schemes:DECLARATION",
})


@dataclass(frozen=True)
class WeightTensor:
    """One matrix of the model. ``role``: projection | lm_head | embedding; ``kind``: the module's last name
    (q_proj .. down_proj, lm_head, embed_tokens); ``index``: its position among the tensors of the same kind (the
    block order llama.cpp's mixes count in); ``tied``: an output head that is the embedding."""

    name: str
    shape: tuple[int, int]  # [out, in] as a Linear holds it ([vocab, hidden] for the embedding)
    role: str
    kind: str
    index: int = 0
    count: int = 1  # how many tensors of this kind the model has
    tied: bool = False

    @property
    def parameters(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class Storage:
    """How one tensor is stored. ``separate``: a tied head stored apart from the embedding (ONNX unties it to
    quantize it); ``quantized``: multiplied in integer arithmetic (the cost model's quantized prefill FLOPs)."""

    format: str
    bytes: float
    quantized: bool = False
    separate: bool = False


@dataclass(frozen=True)
class WeightScheme:
    """Base: float weights at ``element_bytes`` each (what an exporter writes without --quantize)."""

    name: str = "float32"
    element_bytes: float = 4.0
    dtype: str = "float32"  # the torch dtype the runtime holds these weights in

    @property
    def quantizes(self) -> bool:
        return False

    @property
    def changes_weights(self) -> bool:
        """Whether the runtime serves other weights than the float32 checkpoint's (the screen then rounds them)."""
        return self.quantizes or self.dtype != "float32"

    def storage(self, tensor: WeightTensor) -> Storage:
        return Storage(self.name, tensor.parameters * self.element_bytes)

    def fake_quantize(self, weight, tensor: WeightTensor, storage: Storage):
        """The weight as the runtime serves it, in float (identity for float32 storage)."""
        import torch

        return weight if self.dtype == "float32" else weight.to(getattr(torch, self.dtype)).to(weight.dtype)

    def activation_forward(self, module, tensor: WeightTensor, storage: Storage) -> Callable | None:
        """A replacement forward for a Linear whose inputs the runtime quantizes (None: weights only)."""
        return None

    @property
    def ffn_multiple(self) -> int:
        """What every pruned FFN width should be a multiple of for this scheme to store it on its fast path, with
        no fallback (``prune --runtime R --quantize Q`` aligns to it); 1 for float storage."""
        return 1

    def fitted(self, tensors: list[WeightTensor]) -> "WeightScheme":
        """This scheme for a model with these tensors (e.g. a group size that divides them), or a one-line
        EffideployError when the exporter cannot write them."""
        return self

    def export_options(self) -> dict:
        return {"quantize": self.name} if self.quantizes else {}

    def key(self) -> str:
        """What decides the screen's rounding (part of the screen cache's key)."""
        return repr(self)


@dataclass(frozen=True)
class Declaration:
    """What one exporter writes: its float storage, its quantized schemes by name, and the search's generic names
    (int8 / int4) mapped onto them."""

    float: WeightScheme
    schemes: tuple[WeightScheme, ...] = ()
    aliases: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return [s.name for s in self.schemes]

    def resolve(self, name: str | None) -> WeightScheme:
        if name is None:
            return self.float
        wanted = self.aliases.get(str(name).lower(), str(name).lower())
        for scheme in self.schemes:
            if scheme.name == wanted:
                return scheme
        raise OptionError("quantize", f"unknown scheme {name!r}; this runtime's exporter writes "
                                      f"{', '.join(self.names()) or 'float weights only'} (and none)")


FLOAT_ONLY = Declaration(float=WeightScheme())  # a runtime that reads checkpoints as they are


def declaration(runtime: str) -> Declaration:
    """The schemes ``runtime``'s exporter declares (float only for a runtime without an exporter)."""
    from effideploy.runtimes import RUNTIMES

    exporter = RUNTIMES.get(runtime).capabilities.exporter
    return FLOAT_ONLY if exporter is None or exporter not in DECLARATIONS else DECLARATIONS.get(exporter)


def model_tensors(config_dict: dict) -> list[WeightTensor]:
    """Every matrix of the model, from its config alone (built on the meta device: pruned and deci shapes too)."""
    import torch

    from effideploy.models.build import build_config, model_class

    config = build_config(config_dict)
    with torch.device("meta"):
        model = model_class(config)(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    found = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and name.endswith("embed_tokens"):
            found.append((name, tuple(module.weight.shape), "embedding", kind))
        elif isinstance(module, torch.nn.Linear):
            found.append((name, tuple(module.weight.shape), "lm_head" if kind == "lm_head" else "projection", kind))
    if tied and not any(role == "lm_head" for _, _, role, _ in found):
        embed = next(f for f in found if f[2] == "embedding")
        found.append(("lm_head", embed[1], "lm_head", "lm_head"))
    counts: dict[str, int] = {}
    for _, _, _, kind in found:
        counts[kind] = counts.get(kind, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for name, shape, role, kind in found:
        out.append(WeightTensor(name, shape, role, kind, seen.get(kind, 0), counts[kind], tied and role == "lm_head"))
        seen[kind] = seen.get(kind, 0) + 1
    return out


def layout(scheme: WeightScheme, tensors: list[WeightTensor]) -> dict[str, Storage]:
    return {t.name: scheme.storage(t) for t in tensors}


def apply_scheme(model, scheme: WeightScheme):
    """The screen's view of ``scheme``: every tensor of ``model`` rounded as the runtime stores it, in place; a tied
    head the runtime stores apart is untied first; Linears whose inputs the runtime quantizes get that forward."""
    import torch

    if not scheme.changes_weights:
        return model
    tensors = {t.name: t for t in model_tensors(model.config.to_dict())}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head_tensor = tensors.get("lm_head")
    tied = head is not None and head.weight is embedding.weight
    with torch.no_grad():
        if tied and scheme.storage(head_tensor).separate:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            tied = False
        for name, module in model.named_modules():
            tensor = tensors.get(name)
            if tensor is None or (tied and tensor.role == "lm_head"):
                continue  # a tied head is the embedding: rounded once, as its stored table
            if tied and tensor.role == "embedding":
                tensor = head_tensor  # the table the runtime stores is the output head's
            storage = scheme.storage(tensor)
            forward = scheme.activation_forward(module, tensor, storage)  # from the weight before rounding
            module.weight.data = scheme.fake_quantize(module.weight.data, tensor, storage)
            if forward is not None:
                module.forward = forward
    return model


def resolve_values(values, runtime: str) -> tuple:
    """The search's scheme names (generic aliases included) as ``runtime``'s exporter names them."""
    found = declaration(runtime)
    out = []
    for value in values:
        name = None if value is None else found.resolve(value).name
        if name not in out:
            out.append(name)
    return tuple(out)


def fitted_scheme(runtime: str, name: str | None, config_dict: dict) -> WeightScheme:
    """The scheme ``name`` of ``runtime`` fitted to a model's shapes (a one-line EffideployError when it cannot)."""
    return declaration(runtime).resolve(name).fitted(model_tensors(config_dict))
