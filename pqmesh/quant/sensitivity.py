"""Measured per-layer quantization damage: the target an indicator must rank layers by.

Damage of layer ``i`` at ``b`` bits: quantize that layer alone (every other layer, the embeddings
and the head stay 16-bit), run the windows through the model, and compare each predicted position's
next-token distribution with the 16-bit model's: KL(p_16 || p_q) in nats, and the increase of the
negative log-likelihood of the true next token. Both are kept per window, summed over its
``seq_len - 1`` predicted positions, so `DamageTable.split_half` can rank layers on the first and on
the second half of the windows separately and say how well the measurement reproduces. KL is the
primary figure: it is non-negative at every position, where the NLL increase of a mildly damaged
layer is a small difference of large sums whose sign flips from window to window.

`measure_damage` does every layer and every width in one pass per micro-batch: the 16-bit layer
inputs and reference log-probabilities are computed once, then each variant runs from its layer to
the head. Cost per width: about half a forward pass of the model per layer.
`quantized_variants` builds the single-layer variants, round-to-nearest or GPTQ (calibrated on
16-bit inputs, which is what a layer sees when it is the only quantized one).

*Around a width* (`around_variants`, ``measure_damage(base=...)``): the same measure with every
other layer at a reference width instead of 16 bits, calibrated as a uniform checkpoint of that
width would be (GPTQ: each layer on the outputs of the quantized layers before it), and layer ``i``
at ``b`` bits quantized from those same inputs. The damage is still measured against the 16-bit
model; at the reference width itself it is the uniform model's. Near a uniform plan this is what a
plan's damage is made of: single-layer damage measured from 16 bits adds up to far less than the
damage of layers quantized together (Gemma-3-270M, docs/BENCHMARKS.md).

``stride`` scores every ``stride``-th predicted position only (all positions still run through the
layers): on a 262k-token vocabulary the head and the softmax cost twice the decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import structlog
import torch
import torch.nn.functional as F
from torch import nn

from pqmesh.errors import InvalidArgument
from pqmesh.model import ModelShard
from pqmesh.model.kv_cache import AttentionStep
from pqmesh.quant.calibrate import LayerwiseRunner
from pqmesh.quant.calibrated import METHODS, GptqSettings, advance_through, collect_hessians, gptq_layer
from pqmesh.quant.layer import quantize_layer
from pqmesh.quant.qlinear import Workspace
from pqmesh.quant.rank import spearman
from pqmesh.types import DEFAULT_GROUP_SIZE, Bits, parse_bits_list

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DamageTable:
    """Per layer and window: summed KL (nats) and summed NLL increase over ``seq_len - 1`` positions."""

    bits: Bits
    method: str
    seq_len: int
    kl: tuple[tuple[float, ...], ...]  # [layer][window]
    nll: tuple[tuple[float, ...], ...]  # [layer][window]
    stride: int = 1  # every stride-th predicted position was scored

    @property
    def positions(self) -> int:
        """Scored positions per window."""
        return len(range(0, self.seq_len - 1, self.stride))

    @property
    def num_layers(self) -> int:
        return len(self.kl)

    @property
    def windows(self) -> int:
        return len(self.kl[0])

    @property
    def tokens(self) -> int:
        """Scored positions over all windows."""
        return self.windows * self.positions

    def mean_kl(self, windows: slice = slice(None)) -> list[float]:
        """Mean KL per scored position, per layer, over the chosen windows."""
        return [sum(row[windows]) / (len(row[windows]) * self.positions) for row in self.kl]

    def mean_nll(self, windows: slice = slice(None)) -> list[float]:
        """Mean NLL increase per scored token, per layer, over the chosen windows."""
        return [sum(row[windows]) / (len(row[windows]) * self.positions) for row in self.nll]

    def split_half(self, windows: int | None = None, measure: str = "kl") -> float:
        """Spearman between the layer rankings of the first and the second half of the first
        ``windows`` windows (default all): the target's reproducibility at that many tokens."""
        n = self.windows if windows is None else windows
        if not 2 <= n <= self.windows:
            raise InvalidArgument(f"split-half needs 2..{self.windows} windows, got {n}")
        mean = self.mean_kl if measure == "kl" else self.mean_nll
        return spearman(mean(slice(0, n // 2)), mean(slice(n // 2, n // 2 * 2)))

    def to_json(self) -> dict:
        return {"bits": self.bits.count, "method": self.method, "seq_len": self.seq_len, "stride": self.stride,
                "tokens": self.tokens,
                "mean_kl": self.mean_kl(), "mean_nll_increase": self.mean_nll(),
                "kl_per_window": [list(r) for r in self.kl], "nll_per_window": [list(r) for r in self.nll]}


def quantized_variants(
    model_dir: str | Path,
    bits: Sequence[Bits | int | str],
    method: str = "rtn",
    group_size: int = DEFAULT_GROUP_SIZE,
    calibration: LayerwiseRunner | None = None,
    settings: GptqSettings = GptqSettings(),
) -> dict[Bits, list[nn.Module]]:
    """``{bits: [layer 0 quantized, layer 1 quantized, ...]}``, each layer quantized on its own.

    ``gptq`` needs ``calibration``, a runner at the model's input; it is advanced through the 16-bit
    layers (consumed)."""
    widths = [b for b in parse_bits_list(bits) if b.quantized]
    if not widths:
        raise InvalidArgument("give at least one of 8, 4, 3, 2 bits to measure")
    return _variants(model_dir, widths, Bits.B16, method, group_size, calibration, settings)[1]


def around_variants(
    model_dir: str | Path,
    bits: Sequence[Bits | int | str],
    around: Bits | int | str,
    method: str = "rtn",
    group_size: int = DEFAULT_GROUP_SIZE,
    calibration: LayerwiseRunner | None = None,
    settings: GptqSettings = GptqSettings(),
) -> tuple[list[nn.Module], dict[Bits, list[nn.Module]]]:
    """The uniform ``around``-bit layers, and ``{bits: [layer i at bits, ...]}`` for each of
    ``bits`` but ``around`` (16 included: the layer itself), each quantized from the inputs the
    uniform model gives it. ``gptq`` needs ``calibration`` (a runner at the model's input; it is
    advanced through the quantized layers, as `quantize_checkpoint` does)."""
    around = Bits.parse(around)
    if not around.quantized:
        raise InvalidArgument("the reference width must be a quantized one (8, 6, 5, 4, 3 or 2 bits), not 16")
    widths = [b for b in parse_bits_list(bits) if b != around]
    if not widths:
        raise InvalidArgument(f"give at least one width besides the reference {around.count} bits")
    return _variants(model_dir, widths, around, method, group_size, calibration, settings)


def _variants(model_dir, widths: list[Bits], around: Bits, method: str, group_size: int,
              calibration: LayerwiseRunner | None, settings: GptqSettings):
    """Both builders: per layer, the ``around``-bit layer (kept only when quantized; with gptq the
    runner advances through it) and the layer at each of ``widths``, all from the same inputs."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {METHODS}, got {method!r}")
    if method == "gptq" and calibration is None:
        raise InvalidArgument("gptq damage needs calibration windows (a LayerwiseRunner over them)")
    runner = calibration if calibration is not None else _reader_only(model_dir)
    base: list[nn.Module] = []
    out: dict[Bits, list[nn.Module]] = {b: [] for b in widths}
    workspace = Workspace()
    for index in range(runner.num_layers):
        hessians = collect_hessians(runner, runner.load_layer(index)) if method == "gptq" else None

        def built(b: Bits) -> nn.Module:
            layer = runner.load_layer(index)
            if method == "gptq":
                return gptq_layer(runner, layer, b, group_size, settings, workspace, hessians)
            return quantize_layer(layer, b, group_size, workspace)

        for b in widths:
            out[b].append(built(b))
        if around.quantized or method == "gptq":  # rtn from 16 bits needs no base layer
            layer = built(around)
            if around.quantized:
                base.append(layer)
            if method == "gptq":
                advance_through(runner, layer)  # after every width: they calibrate on the same inputs
        log.info("variants_layer", layer=index, around=around.count, method=method)
    if calibration is None:
        runner.close()
    return base, out


def _reader_only(model_dir: str | Path) -> LayerwiseRunner:
    """A runner over one 2-token window: only its `load_layer` is used."""
    return LayerwiseRunner(model_dir, torch.zeros(1, 2, dtype=torch.long), micro_batch=1)


def measure_damage(
    model_dir: str | Path,
    windows: torch.Tensor,
    variants: dict[Bits, list[nn.Module]],
    method: str = "rtn",
    micro_batch: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base: tuple[Bits, list[nn.Module]] | None = None,
    stride: int = 1,
) -> dict[Bits, DamageTable]:
    """The damage of every single-layer variant on ``windows`` ([n, seq_len] token ids).

    With ``base`` ``(width, layers)`` (`around_variants`), the other layers are the base's, and the
    result also holds the base's own damage under its width (the same for every layer)."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise InvalidArgument(f"windows must be [n >= 1, seq_len >= 2] token ids, got {tuple(windows.shape)}")
    if micro_batch < 1:
        raise InvalidArgument(f"micro-batch must be at least 1, got {micro_batch}")
    if stride < 1:
        raise InvalidArgument(f"the position stride must be at least 1, got {stride}")
    width = windows.shape[1]
    shard = ModelShard.load(model_dir, 0, _layers(model_dir), max_slots=micro_batch, max_len=width,
                            dtype=dtype, device=device)
    for b, layers in variants.items():
        if len(layers) != len(shard.layers):
            raise InvalidArgument(
                f"{b.count}-bit variants cover {len(layers)} layers, the model has {len(shard.layers)}; give one each"
            )
    if base is not None and (len(base[1]) != len(shard.layers) or base[0] in variants):
        raise InvalidArgument(f"the base must give all {len(shard.layers)} layers at a width the variants do not have")
    widths = [*variants, *([base[0]] if base is not None else [])]
    kl = {b: [[] for _ in shard.layers] for b in widths}
    nll = {b: [[] for _ in shard.layers] for b in widths}
    for first in range(0, windows.shape[0], micro_batch):
        ids = windows[first:first + micro_batch].to(shard.device)
        _batch_damage(shard, ids, variants, kl, nll, base, stride)
        log.info("damage_batch", windows=first + ids.shape[0], of=windows.shape[0])
    return {b: DamageTable(b, method, width, tuple(map(tuple, kl[b])), tuple(map(tuple, nll[b])), stride)
            for b in widths}


def _layers(model_dir: str | Path) -> int:
    from pqmesh.model.loading import load_config

    return load_config(Path(model_dir)).num_hidden_layers


@torch.inference_mode()
def _batch_damage(shard: ModelShard, ids: torch.Tensor, variants, kl: dict, nll: dict, base, stride: int) -> None:
    """Appends one entry per window of ``ids`` to every ``kl[b][layer]`` and ``nll[b][layer]``."""
    family, batch, width = shard.family, ids.shape[0], ids.shape[1]
    step = AttentionStep.for_prefill(shard.cache, list(range(batch)), [width] * batch, width, shard.device)
    extras = family.step_extras(shard.runtime, step, shard.dtype)
    layers = list(shard.layers) if base is None else base[1]

    def run(x: torch.Tensor, start: int, first: nn.Module | None = None, stack=layers, keep: list | None = None):
        for index in range(start, len(stack)):
            if keep is not None:
                keep.append(x)
            layer = first if (first is not None and index == start) else stack[index]
            x = family.layer(layer, index, x, step, extras)
        return x

    targets = ids[:, 1::stride]
    embedded = family.embed(shard.embed, ids, step)
    inputs: list[torch.Tensor] = []
    x = run(embedded, 0, stack=list(shard.layers), keep=inputs if base is None else None)
    reference = [_log_probs(shard, x[w:w + 1], stride)[0] for w in range(batch)]  # [positions, vocab] each
    ref_nll = [-r.gather(-1, targets[w, :, None]).sum() for w, r in enumerate(reference)]

    def score(out: torch.Tensor, b: Bits, index: int | None) -> None:
        for w in range(batch):
            logq, ref = _log_probs(shard, out[w:w + 1], stride)[0], reference[w]
            divergence = float((ref.exp() * (ref - logq)).sum())
            increase = float(-logq.gather(-1, targets[w, :, None]).sum() - ref_nll[w])
            for i in range(len(layers)) if index is None else (index,):  # the base: the same for every layer
                kl[b][i].append(divergence)
                nll[b][i].append(increase)

    if base is not None:
        score(run(embedded, 0, keep=inputs), base[0], None)
    for b, q_layers in variants.items():
        for index, q_layer in enumerate(q_layers):
            score(run(inputs[index], index, q_layer), b, index)


def _log_probs(shard: ModelShard, hidden: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Log-probabilities at every ``stride``-th position but the last ([b, positions, vocab], float32)."""
    logits = shard.head(shard.family.final(shard.final, hidden[:, :-1:stride])).float()
    return F.log_softmax(logits, dim=-1)
