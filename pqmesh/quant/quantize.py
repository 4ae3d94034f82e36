"""Offline quantization of a whole checkpoint, one decoder layer at a time (`pqmesh quantize`).

Only one 16-bit decoder layer is in memory at a time, plus, for GPTQ, the calibration hidden
states (windows x tokens x hidden): a model larger than memory quantizes on one device. Each layer
is written to its own safetensors file as soon as it is quantized (`pqmesh.quant.checkpoint` has the
format). Everything is written into a temporary sibling directory that is renamed at the end, so an
interrupted run never leaves a half-written checkpoint where a stage could load it.

Computation runs in float32 (any device): the stored format is the same whatever the device.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import structlog
import torch
from safetensors.torch import save_file

from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.model.families import family_for
from pqmesh.model.loading import INDEX_FILE, CheckpointReader, fill_module, load_config
from pqmesh.quant.calibrate import LayerwiseRunner
from pqmesh.quant.calibrated import METHODS, GptqSettings, advance_through, gptq_layer
from pqmesh.quant.checkpoint import OTHER_FILE, QuantizedCheckpoint, fingerprint, layer_file, read_quantized
from pqmesh.quant.layer import quantize_layer
from pqmesh.quant.qlinear import QuantLinear, Workspace
from pqmesh.types import DEFAULT_GROUP_SIZE, Bits, parse_bits_list

log = structlog.get_logger(__name__)


def _check_inputs(model_dir: Path, out_dir: Path, plan: list[Bits], method: str, windows) -> None:
    if method not in METHODS:
        raise InvalidArgument(f"quantization method must be one of {METHODS}, got {method!r}")
    if method == "gptq" and windows is None:
        raise InvalidArgument("gptq needs calibration text: pass --calib FILE (or use --method rtn)")
    if read_quantized(model_dir) is not None:
        raise FailedPrecondition(f"{model_dir} is already quantized; quantize from its 16-bit checkpoint")
    layers = load_config(model_dir).num_hidden_layers
    if len(plan) != layers:
        raise InvalidArgument(f"the bit plan has {len(plan)} entries but the model has {layers} layers")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FailedPrecondition(f"output directory {out_dir} is not empty; give a new --out or delete it")
    if out_dir.resolve() == model_dir.resolve():
        raise InvalidArgument("--out must differ from --model")


def _save_layer(layer: torch.nn.Module, prefix: str, path: Path, bits: Bits) -> dict[str, str]:
    for module in layer.modules():
        if isinstance(module, QuantLinear) and module.layout != "planes":
            raise AssertionError("quantize writes the generic layout; it computes in float32")
    state = {f"{prefix}.{key}": t.detach().contiguous().cpu() for key, t in layer.state_dict().items()}
    save_file(state, path, metadata={"format": "pt", "pqmesh_bits": str(bits.value)})
    return {name: path.name for name in state}


def _copy_other(reader: CheckpointReader, consumed: set[str], path: Path) -> dict[str, str]:
    state = {name: reader.get(name).contiguous() for name in reader.names() if name not in consumed}
    save_file(state, path, metadata={"format": "pt"})
    return {name: path.name for name in state}


def _copy_side_files(model_dir: Path, staging: Path) -> None:
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.startswith(".") and item.suffix != ".safetensors" \
                and item.name != INDEX_FILE:
            shutil.copy2(item, staging / item.name)


def _write(model_dir, staging, plan, method, windows, group_size, settings, batch, device) -> dict[str, str]:
    config = load_config(model_dir)
    family = family_for(config)
    runner = LayerwiseRunner(model_dir, windows, micro_batch=batch, device=device) if method == "gptq" else None
    reader = runner.reader if runner is not None else CheckpointReader(model_dir)
    weight_map, consumed, workspace = {}, set(), Workspace()
    try:
        for index, bits in enumerate(plan):
            started = time.perf_counter()
            prefix = f"{family.layer_prefix}{index}"
            with torch.device("meta"):
                layer = family.build_layer(index)
            consumed.update(reader.resolve(f"{prefix}.{key}") for key in layer.state_dict())
            layer = fill_module(layer, prefix, reader, torch.float32, device)
            if runner is not None:
                layer = gptq_layer(runner, layer, bits, group_size, settings, workspace)
                advance_through(runner, layer)
            else:
                layer = quantize_layer(layer, bits, group_size, workspace)
            weight_map.update(_save_layer(layer, prefix, staging / layer_file(index), bits))
            log.info("quantize_layer_done", layer=index, bits=bits.value, method=method,
                     seconds=round(time.perf_counter() - started, 2))
        weight_map.update(_copy_other(reader, consumed, staging / OTHER_FILE))
    finally:
        reader.close()
    return weight_map


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    plan: Sequence[Bits | int | str],
    method: str = "gptq",
    windows: torch.Tensor | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    settings: GptqSettings = GptqSettings(),
    batch: int = 4,
    device: str | torch.device = "cpu",
    calibration: dict | None = None,
) -> QuantizedCheckpoint:
    """Writes ``model_dir`` quantized per ``plan`` (one width per layer) to ``out_dir``."""
    model_dir, out_dir, plan = Path(model_dir), Path(out_dir), parse_bits_list(plan)
    _check_inputs(model_dir, out_dir, plan, method, windows)
    config = load_config(model_dir)
    calib = dict(calibration or {})
    if method == "gptq":
        calib.update(windows=int(windows.shape[0]), seq_len=int(windows.shape[1]), damp=settings.damp,
                     act_order=settings.act_order, true_sequential=settings.true_sequential,
                     hessian_clip=settings.hessian_clip)
    info = QuantizedCheckpoint(tuple(plan), group_size, method, fingerprint(config),
                               getattr(config, "name_or_path", "") or model_dir.name, calib)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        weight_map = _write(model_dir, staging, plan, method, windows, group_size, settings, batch, device)
        total = sum((staging / name).stat().st_size for name in set(weight_map.values()))
        index = {"metadata": {"total_size": total, "pqmesh": info.to_json()}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        _copy_side_files(model_dir, staging)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("quantized_checkpoint_written", out=str(out_dir), method=method, bits=[b.value for b in plan])
    return info
