"""Prune a model: calibrate, score, allocate, then rewrite it in memory or stream it to a new checkpoint."""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import torch
from torch import nn

import effideploy
from effideploy import progress
from effideploy.checkpoint.config import pruned_config
from effideploy.checkpoint.writer import (PROVENANCE_FILE, PROVENANCE_FORMAT, ShardWriter, copy_remote_code,
                                         copy_tokenizer, source_record)
from effideploy.data.text import TextSpec, load_text, sample_windows, tokenize_text
from effideploy.errors import EffideployError, OptionError
from effideploy.io import atomic_output_dir, check_output_dir, scratch_dir, write_json
from effideploy.models.build import build_config, count_parameters, ffn_widths, load_tokenizer
from effideploy.models.layerwise import LayerwiseModel
from effideploy.models.resolve import ModelSource
from effideploy.models.weights import SafetensorsWeights, StateDictWeights
from effideploy.pruning.calibration import CalibrationStats, collect_stats
from effideploy.quantization.hessians import write_checkpoint_hessians
from effideploy.pruning.config import PruneConfig
from effideploy.pruning.depth import ModelShape
from effideploy.pruning.methods import METHODS
from effideploy.pruning.methods.base import FFNWeights, PruningMethod
from effideploy.pruning.plan import BlockPlan, PrunePlan
from effideploy.pruning.rewrite import apply_plan, rewrite_block


class BlockFFNs:
    """Every block's FFN weights as a sequence read on demand (a method that needs them all gets one at a time)."""

    def __init__(self, model: LayerwiseModel) -> None:
        self.model = model

    def __len__(self) -> int:
        return self.model.num_layers

    def __getitem__(self, index: int) -> FFNWeights:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return ffn_weights(self.model, index)


def ffn_weights(model: LayerwiseModel, index: int) -> FFNWeights:
    prefix = f"model.layers.{index}.mlp."
    get = model.weights.get
    return FFNWeights(
        gate=get(prefix + "gate_proj.weight", torch.float32),
        up=get(prefix + "up_proj.weight", torch.float32),
        down=get(prefix + "down_proj.weight", torch.float32),
    )


# lstsq solves width + 1 unknowns per output row from the calibration second moments; below this many tokens
# per unknown the refit chases noise (SmolLM2 at 50%, 512 tokens for 769 unknowns: perplexity 3230 instead of ~60).
LSTSQ_TOKENS_PER_UNKNOWN = 4


def make_method(config: PruneConfig) -> PruningMethod:
    return METHODS.get(config.method)(config)


def needs_gram(config: PruneConfig) -> bool:
    return make_method(config).compensation == "lstsq"


def needs_calibration(config: PruneConfig) -> bool:
    method = make_method(config)
    return method.needs_calibration or method.compensation != "none"


def memory_plan(config: PruneConfig, config_dict: dict, *, announce: bool = True):
    """Device, compute dtype and the calibration's memory plan (``effideploy.memory_plan``), from config.json's
    shapes before anything is loaded: printed on stderr, and a plan that does not fit is refused here."""
    from effideploy.device import compute_dtype, device_available_bytes, host_available_bytes, resolve_device
    from effideploy.memory_plan import Shapes, plan_calibration

    device = resolve_device(config.device)
    dtype = compute_dtype(device, config.calib_dtype)
    limit = int(config.max_memory_gb * 1e9) if config.max_memory_gb else host_available_bytes()
    plan = plan_calibration(Shapes.from_config(config_dict), windows=config.calib_samples, seqlen=config.calib_seqlen,
                            batch_size=config.batch_size, gram=needs_gram(config), device=str(device), dtype=dtype,
                            host_limit=limit, device_free=device_available_bytes(device))
    plan.check()  # refused as one line (which names the figures), before the plan is printed
    if announce:
        progress.console.print(plan.describe(), highlight=False, soft_wrap=True)
    return device, dtype, plan


def calibrate(model: LayerwiseModel, config: PruneConfig, windows: torch.Tensor | None,
              gram_dir: str | None = None, memory=None, hessians_dir: str | None = None) -> CalibrationStats | None:
    """``memory``: what :func:`memory_plan` returned (else the device and dtype are resolved here, unplanned)."""
    method = make_method(config)
    if not needs_calibration(config) and hessians_dir is None:
        return None
    if windows is None:
        raise EffideployError(f"{config.method!r} with {method.compensation!r} compensation needs calibration windows")
    device, dtype, plan = memory or (*_device_and_dtype(config), None)
    return collect_stats(model, windows, config.batch_size, dtype, gram=needs_gram(config),
                         gram_dir=gram_dir, gram_stride=config.gram_stride, device=device,
                         activations_on_device=plan is None or plan.activations_on_device or device.type == "cpu",
                         hessians_dir=hessians_dir)


def _device_and_dtype(config: PruneConfig) -> tuple[torch.device, str]:
    from effideploy.device import compute_dtype, resolve_device

    device = resolve_device(config.device)
    return device, compute_dtype(device, config.calib_dtype)


def plan_from_stats(model: LayerwiseModel, config: PruneConfig, stats: CalibrationStats | None) -> PrunePlan:
    """Scores, widths and kept channels from calibration statistics (which several methods can share)."""
    method = make_method(config)
    if method.compensation != "none" and stats is None:
        raise EffideployError(f"{method.compensation} compensation needs calibration statistics")
    if method.compensation == "lstsq" and not stats.blocks[0].has_gram:
        raise EffideployError("lstsq compensation needs second moments: calibrate with gram=True")
    start = time.perf_counter()
    scores = []
    for index in range(model.num_layers):
        score = method.score(ffn_weights(model, index), stats.blocks[index] if stats else None)
        if not torch.isfinite(score).all():
            raise EffideployError(f"block {index}: {config.method} produced non-finite channel scores")
        scores.append(score)
    shape = ModelShape.of(model.config)
    structure = method.structure(scores, stats, shape, BlockFFNs(model))
    widths = structure.widths
    importance = method.block_importance(stats)
    blocks = []
    short = []
    for index, (score, width) in enumerate(zip(scores, widths)):
        compensation = method.compensation
        if getattr(method, "structural", False) and width >= len(score):
            compensation = "none"  # nothing removed from this FFN: nothing to refit
        if compensation == "lstsq" and stats.blocks[index].gram_tokens < LSTSQ_TOKENS_PER_UNKNOWN * (width + 1):
            compensation = "bias"  # too few tokens for width + 1 unknowns: the refit would fit calibration noise
            short.append(index)
        dropped = index in structure.dropped
        # A stable sort keeps tie-breaking (and therefore the checkpoint) identical from run to run.
        kept = torch.sort(score, descending=True, stable=True).indices[:0 if dropped else width].sort().values
        blocks.append(
            BlockPlan(index=index, full_width=len(score), kept=kept,
                      importance=None if importance is None else float(importance[index]),
                      compensation="none" if dropped else compensation, damp=config.damp,
                      stats=stats.blocks[index] if stats is not None else None,
                      attention=index not in structure.no_attention, dropped=dropped)
        )
    if short:
        progress.console.print(
            f"warning: {len(short)} block(s) got bias instead of lstsq compensation: their least-squares refit "
            f"needs {LSTSQ_TOKENS_PER_UNKNOWN} calibration tokens per kept channel, the second moments hold "
            f"{stats.blocks[short[0]].gram_tokens} (use more --calib-samples or a smaller --gram-stride)",
            highlight=False)
    plan = PrunePlan(config=config, blocks=blocks, stats=stats)
    plan.seconds["score_and_allocate"] = time.perf_counter() - start
    if stats is not None:
        plan.seconds["calibration"] = stats.seconds
    return plan


def plan_pruning(model: LayerwiseModel, config: PruneConfig, windows: torch.Tensor | None) -> PrunePlan:
    return plan_from_stats(model, config, calibrate(model, config, windows))


def prune_(model: nn.Module, config: PruneConfig, windows: torch.Tensor | None = None) -> PrunePlan:
    """Prune a loaded LlamaForCausalLM in place (``quantize_``-style) and return the plan that was applied."""
    if hasattr(model.config, "block_configs"):
        raise EffideployError("the model is already pruned (nemotron-nas); prune the dense model instead")
    config_copy = build_config(model.config.to_dict())
    layerwise = LayerwiseModel(config_copy, StateDictWeights(model.state_dict()))
    with torch.no_grad():
        plan = plan_pruning(layerwise, config, windows)
    if plan.removes_sublayers:
        raise EffideployError(f"{config.method} removes blocks or attention sublayers, which the in-memory prune_ does "
                              "not rewrite; write a checkpoint with prune_checkpoint")
    apply_plan(model, plan)
    return plan


def calibration_windows(tokenizer, text: TextSpec, config: PruneConfig) -> torch.Tensor:
    with progress.status(f"Tokenizing {Path(text.path).name}"):
        ids = tokenize_text(tokenizer, load_text(text))
    return sample_windows(ids, config.calib_samples, config.calib_seqlen, config.seed)


def prune_checkpoint(
    source: ModelSource,
    config: PruneConfig,
    output: str | Path,
    *,
    calibration: TextSpec | None,
    overwrite: bool = False,
    stats: CalibrationStats | None = None,
    hessians_dir: str | Path | None = None,
) -> tuple[Path, PrunePlan]:
    """Prune ``source`` block by block and write the smaller checkpoint to ``output`` (atomically).

    ``stats`` from :func:`calibrate_source` (same model, text and calibration options) skips the calibration
    pass, so several sparsities or methods share one pass; with ``config.keep_stats`` the Linear input second
    moments of that pass are read from ``hessians_dir`` (``calibrate_source(..., hessians_dir=...)``).
    """
    if source.is_pruned_checkpoint:
        raise EffideployError(f"{source.path} is already a pruned checkpoint; prune the dense model instead")
    target = check_output_dir(output, overwrite=overwrite, inputs=(source.path,))
    if getattr(make_method(config), "structural", False) and config.keep_stats:  # unknown names fail here too
        raise OptionError("keep_stats", f"is not supported with {config.method} yet (the kept statistics follow the "
                                        "dense block numbering, which removed blocks change)")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    model_config = build_config(source.config_dict)
    check_prunable(config, model_config, source.config_dict)
    # Refused here, before any work; printed once the calibration text has been read (bad text fails in one line).
    memory = memory_plan(config, source.config_dict, announce=False) \
        if stats is None and needs_calibration(config) else None
    weights = SafetensorsWeights(source.path)
    layerwise = LayerwiseModel(model_config, weights)

    method = make_method(config)
    # Second moments are spooled to disk block by block (n x n each) until the rewrite reads them back.
    with scratch_dir(target, "gram") as gram_dir:
        if stats is None and (method.needs_calibration or method.compensation != "none" or config.keep_stats):
            if calibration is None:
                raise EffideployError(f"method {config.method!r} needs calibration text (--calib)")
            tick = time.perf_counter()
            windows = calibration_windows(load_tokenizer(source), calibration, config)
            timings["tokenize"] = time.perf_counter() - tick
            if memory is not None:
                progress.console.print(memory[2].describe(), highlight=False, soft_wrap=True)
            hessians_dir = gram_dir if config.keep_stats else None
            stats = calibrate(layerwise, config, windows, gram_dir=gram_dir, memory=memory, hessians_dir=hessians_dir)
        elif config.keep_stats and hessians_dir is None:
            raise EffideployError("keep_stats with shared statistics needs the hessians_dir of that calibration pass")
        with torch.no_grad():
            plan = plan_from_stats(layerwise, config, stats)
        if sum(plan.widths) >= sum(plan.full_widths) and not plan.removes_sublayers:
            raise EffideployError(f"nothing would be pruned at --sparsity {config.sparsity} with --align {config.align} "
                                  f"(FFN widths {min(plan.full_widths)}..{max(plan.full_widths)}); nothing was written")
        timings.update(plan.seconds)

        tick = time.perf_counter()
        kept = plan.kept_blocks
        new_config = pruned_config(model_config, [block.width for block in kept],
                                   mlp_bias=plan.has_bias or model_config.mlp_bias,
                                   attention=[block.attention for block in kept])
        with atomic_output_dir(target, overwrite=overwrite) as staging:
            write_blocks(layerwise, plan, new_config.mlp_bias, staging)
            new_config.save_pretrained(staging)
            copy_remote_code(staging)
            copy_tokenizer(source.path, staging)
            if config.keep_stats:
                write_checkpoint_hessians(staging, hessians_dir, [block.kept for block in plan.blocks],
                                          stats.n_windows)
            timings["write"] = time.perf_counter() - tick
            timings["total"] = time.perf_counter() - started
            write_json(staging / PROVENANCE_FILE,
                       provenance(source, config, plan, model_config, new_config, calibration, timings))
    return target, plan


def check_prunable(config: PruneConfig, model_config, config_dict: dict) -> None:
    """Options that only make sense against the model: refused before any work instead of a silent no-op."""
    from effideploy.models.resolve import check_seqlen

    narrowest = min(ffn_widths(model_config))
    if config.align >= narrowest:
        raise OptionError("align", f"{config.align} is not smaller than the narrowest FFN width {narrowest}: "
                              "nothing could be pruned")
    check_seqlen(config_dict, config.calib_seqlen, "--calib-seqlen")
    blocks = model_config.num_hidden_layers
    if config.count is not None and config.count >= blocks:  # the exact limit (first-block rule) comes with the scores
        raise OptionError("count", f"{config.count} is more than the {blocks - 1} sublayers that can be removed from "
                                   f"{blocks} blocks")


def calibrate_source(source: ModelSource, config: PruneConfig, calibration: TextSpec, *,
                     gram: bool | None = None, gram_dir: str | None = None,
                     hessians_dir: str | None = None) -> CalibrationStats:
    """One calibration pass over ``source``, reusable by ``prune_checkpoint(..., stats=...)`` for every method
    and sparsity that shares the calibration options (text, windows, seqlen, seed, dtype). ``gram`` (default:
    whether ``config`` needs it) collects the second moments lstsq compensation reads; ``gram_dir`` spools them
    to disk and must outlive the checkpoints written from these statistics."""
    device, dtype, plan = memory_plan(config, source.config_dict, announce=False)
    layerwise = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))
    windows = calibration_windows(load_tokenizer(source), calibration, config)
    progress.console.print(plan.describe(), highlight=False, soft_wrap=True)
    with torch.no_grad():
        return collect_stats(layerwise, windows, config.batch_size, dtype,
                             gram=needs_gram(config) if gram is None else gram, gram_dir=gram_dir,
                             gram_stride=config.gram_stride, device=device,
                             activations_on_device=plan.activations_on_device or device.type == "cpu",
                             hessians_dir=hessians_dir)


def write_blocks(model: LayerwiseModel, plan: PrunePlan, with_bias: bool, folder: Path) -> None:
    weights = model.weights
    outer = [name for name in weights.names() if not name.startswith("model.layers.")]
    if model.config.tie_word_embeddings:
        outer = [name for name in outer if name != "lm_head.weight"]
    device = _device_and_dtype(plan.config)[0]  # the lstsq solves run there
    # write_block_shards' layout, written here so that the outer tensors (embeddings and head: 0.5 GB for
    # Llama-2-7B, 2 GB for a 128k vocabulary) are freed before the blocks are read, not held until the last one.
    # Dropped blocks are not written; the ones after them are renumbered.
    kept = plan.kept_blocks
    writer = ShardWriter(folder, n_shards=len(kept) + 1)
    writer.add({name: weights.get(name) for name in outer})
    for new_index, block in enumerate(progress.track(kept, "Writing pruned blocks")):
        tensors = rewrite_block({name: weights.get(name) for name in block_tensor_names(model, block)}, block,
                                with_bias=with_bias, device=device)
        writer.add(renumbered(tensors, block.index, new_index))
    writer.finish()

ATTENTION_TENSORS = (".self_attn.", ".input_layernorm.")


def block_tensor_names(model: LayerwiseModel, block: BlockPlan) -> list[str]:
    """The block's tensors that the checkpoint keeps: a no-op attention has no weights (nor its norm)."""
    names = model.block_tensor_names(block.index)
    if not block.attention:
        names = [name for name in names if not any(part in name for part in ATTENTION_TENSORS)]
    return names


def renumbered(tensors: dict[str, torch.Tensor], old: int, new: int) -> dict[str, torch.Tensor]:
    """Dropped blocks are removed from the checkpoint, so the blocks after them move up (``model.layers.{new}``)."""
    prefix, target = f"model.layers.{old}.", f"model.layers.{new}."
    return {(target + name[len(prefix):] if name.startswith(prefix) else name): tensor for name, tensor in tensors.items()}


def pruning_code_fingerprint() -> str:
    """sha256 of effideploy's pruning and checkpoint sources: a checkpoint is only as reproducible as the code
    that wrote it, and ``effideploy run`` reuses a checkpoint only when this matches as well as the options."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.joinpath("pruning").rglob("*.py"), *root.joinpath("checkpoint").rglob("*.py"),
                        root / "models" / "layerwise.py", root / "models" / "weights.py"]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def provenance(source, config, plan, model_config, new_config, calibration, timings) -> dict:
    before = count_parameters(model_config)
    after = count_parameters(new_config)
    stats = plan.stats
    return {
        "format": PROVENANCE_FORMAT,
        "effideploy_version": effideploy.__version__,
        "code": pruning_code_fingerprint(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_record(source),
        "method": config.method,
        "config": config.to_dict(),
        "compensation": make_method(config).compensation,
        "calibration": None if stats is None else {
            "text": calibration.name, "path": calibration.path, "split": calibration.split,
            "windows": stats.n_windows, "seqlen": stats.seqlen, "seed": config.seed,
            "tokens": stats.n_windows * stats.seqlen,
            "device": str(_device_and_dtype(config)[0]), "compute_dtype": _device_and_dtype(config)[1],
        },
        "sparsity": {
            "ffn_requested": config.sparsity,
            "ffn_actual": plan.ffn_sparsity,
            "parameters_removed": 1.0 - after["total"] / before["total"],
        },
        "parameters": {"before": before, "after": after},
        "structure": structure_record(plan),
        "blocks": [
            {
                "index": block.index,
                "full_width": block.full_width,
                "kept_width": block.width,
                "importance": block.importance,
                "angular_distance": None if stats is None else stats.blocks[block.index].angular,
                "compensation": block.compensation,
                **sublayer_record(block, stats),
            }
            for block in plan.blocks
        ],
        "seconds": timings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads()},
    }


def structure_record(plan: PrunePlan) -> dict:
    """Which sublayers were removed; the scores behind the choice are in each block's record."""
    kept = [block.index for block in plan.kept_blocks]
    return {
        "dropped_blocks": plan.dropped_blocks,
        "no_op_attention": plan.no_op_attention,
        "kept_blocks": kept,  # checkpoint block j is original block kept[j]
        "no_op_attention_in_checkpoint": [kept.index(i) for i in plan.no_op_attention],
        "rule": ("removed by the smallest angular distance (ShortGPT)" if plan.config.method in ("drop-blocks", "drop-attention")
                 else "removed by estimated output loss per parameter saved (effideploy.pruning.depth)"
                 if plan.removes_sublayers else "none removed"),
    }


def sublayer_record(block: BlockPlan, stats: CalibrationStats | None) -> dict:
    record = {"attention": "kept" if block.attention and not block.dropped else "removed", "dropped": block.dropped}
    if stats is not None:
        measured = stats.blocks[block.index]
        record["scores"] = {
            "attention_angular_distance": measured.attention_angular, "ffn_angular_distance": measured.ffn_angular,
            "drop_loss": {part: measured.drop_loss(part) for part in ("block", "attention", "ffn")},
        }
    return record


def original_widths(source: ModelSource) -> list[int]:
    return ffn_widths(build_config(source.config_dict))
