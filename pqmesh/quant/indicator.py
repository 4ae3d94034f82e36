"""Per-layer sensitivity to quantization: the table the planner reads (LLM-PQ's indicator).

Rounding a weight to a grid of step ``s`` leaves an error uniform in ``[-s/2, s/2]``, of variance
``s**2 / 12``. For ``y = W x`` with independent errors, the output error summed over outputs is
``sum_j c_j x_j**2`` with ``c_j = (1/12) sum_n s[n, g(j)]**2`` (`column_noise`), ``s`` being the
steps our quantizer really picks (`quantize_weight`, clipping included). Summed over a layer's
linears, that is the layer's noise for one token; the kinds differ in how tokens are averaged:

*variance-abs*: the mean over all calibration tokens, i.e. ``sum_j c_j E[x_j**2]`` per linear,
summed over linears (LLM-PQ's form at group granularity; LLM-PQ uses one step per tensor).

*variance* (default): the mean over tokens of that noise divided by ``||h_t||**2``, the energy of
the token's residual stream entering the layer. Later layers see a residual stream that has grown
(and one channel of the first token explodes at SmolLM2's layer 11), so absolute noise mostly
measures depth: on SmolLM2-135M its Spearman correlation with the measured single-layer 3-bit
perplexity increase is -0.08, the relative form's 0.54 (docs/BENCHMARKS.md).

*direct*: each layer quantized for real and run on the same inputs as the 16-bit layer; the value
is the mean over tokens of ``||y_q,t - y_t||**2 / ||h_t||**2``, the real change of the layer's
output relative to the same residual stream (Spearman 0.62 on SmolLM2, against 0.49 for the
error relative to the layer's whole output, ``sum ||y_q - y||**2 / sum ||y||**2``).

*kl*: the damage itself, measured on the calibration windows (`pqmesh.quant.sensitivity`): each
layer quantized alone, the mean KL divergence per position of the model's next-token distribution
from the 16-bit one. The dearest kind (about half a forward pass of the model per layer and width)
and the one that measures what the others approximate: on SmolLM2-135M at 3 bits its Spearman
correlation with the damage measured on WikiText-2 test text is 0.976 for RTN and 0.822 for GPTQ,
against 0.78 / 0.665 for *direct* and 0.44 / 0.07 for *variance* (docs/BENCHMARKS.md).

*kl around a width* (``around=4``): the same damage with every other layer at that width, as a
uniform checkpoint of it is quantized (`pqmesh.quant.sensitivity.around_variants`). Layer ``i``'s
value at ``b`` bits is ``KL(i at b) - KL(i at 16)``, both with the rest at the reference width: its
sum over a plan is the first-order change of the whole model's damage, which is what a plan near
uniform ``around`` bits is chosen by (the 16-bit entry stays 0; a per-layer constant moves no
choice). Measured from 16 bits instead, layers' damages add up to a third of what they do together
on Gemma-3-270M at 5 bits, and the plan chosen by them lost to uniform 4 (docs/BENCHMARKS.md).
Each width other than the reference is charged ``confidence`` standard errors of its per-window
difference from the reference (default 1; the errors go into the file's ``stderr``): a layer moves
away from the reference width only where the measured gain stands out of the measurement's noise. On
Gemma-3-270M the plain means of 4 held-out windows took a 5+3 trade predicted 0.0008 KL better that
measured 2.5% worse in perplexity; charged, 8 windows keep uniform 4, while their plain means pick
the one trade that measured better (docs/BENCHMARKS.md: the default is the cautious side).
``measure`` gives the windows the damage is measured on when they should differ from the
calibration windows (the quantizer then calibrates on the runner's windows only, as a real
checkpoint would, and the damage is what it does on text it has not seen).

Means are sums over every token of every micro-batch divided once by the token count, so unequal
micro-batches weigh their tokens equally. File format, version 1 (JSON): ``{"version": 1, "model",
"kind", "group_size", "samples", "seq_len", "tokens", "layers": [{"layer": i, "bits": {"16": 0.0,
"8": x, ...}}]}``; `load_indicator` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Sequence

import structlog
import torch
from torch import nn

from pqmesh.errors import InvalidArgument
from pqmesh.quant.calibrate import LayerwiseRunner
from pqmesh.quant.calibrated import METHODS, GptqSettings, collect_hessians, gptq_layer
from pqmesh.quant.indicator_file import KINDS, IndicatorTable
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE, linear_children, quantize_layer
from pqmesh.quant.qlinear import Workspace, quantize_weight
from pqmesh.quant.sensitivity import around_variants, measure_damage, quantized_variants
from pqmesh.types import Bits, parse_bits_list

log = structlog.get_logger(__name__)

def column_noise(weight: torch.Tensor, bits: Bits, group_size: int) -> torch.Tensor:
    """``c[j] = (1/12) sum_n s[n, g(j)]**2``: the output error variance (summed over outputs) that
    a unit second moment on input channel ``j`` produces, for the steps `quantize_weight` picks."""
    q = quantize_weight(weight, bits, group_size)
    return (q.scale.float().square().sum(dim=0) / 12.0).repeat_interleave(q.group_size)


class NoiseMeter:
    """Expected quantization noise of a layer's linears, token by token, accumulated over all
    calibration tokens (sums and a token count across micro-batches; means taken once at the end).

    Per token ``t`` and width ``b``: ``noise_t = sum over linears of x_t**2 @ c_b`` (`column_noise`).
    ``absolute(b)`` is its mean over tokens (LLM-PQ's form); ``relative(b)`` the mean of
    ``noise_t / ||h_t||**2`` with ``h_t`` the layer's input residual stream.
    """

    def __init__(self, layer: nn.Module, widths: Sequence[Bits], group_size: int) -> None:
        slots = linear_children(layer)
        self.coef = {s.name: {b: column_noise(s.linear.weight, b, group_size) for b in widths} for s in slots}
        self.widths = list(widths)
        self.abs_sum = {b: 0.0 for b in widths}
        self.rel_sum = {b: 0.0 for b in widths}
        self.tokens = 0
        self._pending: dict[Bits, torch.Tensor] = {}
        self._handles = [s.linear.register_forward_pre_hook(self._hook(s.name)) for s in slots]

    def _hook(self, name: str):
        def hook(module, args):
            x2 = args[0].float().square()
            for b in self.widths:
                noise = x2 @ self.coef[name][b].to(x2.device)
                self._pending[b] = self._pending[b] + noise if b in self._pending else noise

        return hook

    def close_batch(self, residual: torch.Tensor) -> None:
        """Books the micro-batch that just ran, whose layer input was ``residual`` [b, T, hidden]."""
        energy = residual.double().square().sum(dim=-1).clamp_min(1e-30)
        for b in self.widths:
            noise = self._pending.pop(b).double()
            self.abs_sum[b] += float(noise.sum())
            self.rel_sum[b] += float((noise / energy).sum())
        self.tokens += energy.numel()

    def absolute(self, bits: Bits) -> float:
        return self.abs_sum[bits] / self.tokens

    def relative(self, bits: Bits) -> float:
        return self.rel_sum[bits] / self.tokens

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _direct_layers(runner: LayerwiseRunner, index: int, widths, group_size: int, method: str,
                   settings: GptqSettings) -> dict:
    if method == "gptq":
        hessians = collect_hessians(runner, runner.load_layer(index))  # one pass serves every width
        return {b: gptq_layer(runner, runner.load_layer(index), b, group_size, settings, hessians=hessians)
                for b in widths}
    return {b: quantize_layer(runner.load_layer(index), b, group_size, Workspace()) for b in widths}


def compute_indicator(
    runner: LayerwiseRunner,
    bits: Sequence[Bits | int | str] = (8, 4, 3, 2),
    kind: str = "variance",
    group_size: int = DEFAULT_GROUP_SIZE,
    model_name: str = "",
    method: str = "rtn",
    settings: GptqSettings = GptqSettings(),
    around: Bits | int | str = Bits.B16,
    measure: torch.Tensor | None = None,
    stride: int = 1,
    confidence: float | None = None,
) -> IndicatorTable:
    """Runs the runner's windows through every layer and returns the indicator table.

    ``method`` picks the quantizer of the *direct* and *kl* kinds: ``rtn``, or ``gptq`` calibrated on
    the same windows (16-bit inputs to each layer) with ``settings``. The variance kinds depend only on the grid steps.
    The *kl* kind alone takes ``around`` (a reference width for the other layers), ``measure``
    (windows to measure on, default the runner's), ``stride`` (score every stride-th position) and,
    with ``around``, ``confidence`` (standard errors each move away from it is charged; default 1).
    The runner must be at the model's input (not advanced)."""
    widths, around, confidence = _checked(bits, kind, method, around, measure, stride, confidence)
    if kind == "kl":
        return _kl_table(runner, widths, group_size, model_name, method, settings, around,
                         runner.windows if measure is None else measure, stride, confidence)
    values = []
    for index in range(runner.num_layers):
        layer = runner.load_layer(index)
        meter = NoiseMeter(layer, widths, group_size) if kind != "direct" else None
        quantized = _direct_layers(runner, index, widths, group_size, method, settings) if meter is None else {}
        err, tokens, outputs = {b: 0.0 for b in widths}, 0, []
        for part in runner.batches():
            x = runner.hidden[part]
            y = runner.forward(layer, x)
            outputs.append(y)
            if meter is not None:
                meter.close_batch(x)
            energy = x.double().square().sum(dim=-1).clamp_min(1e-30)  # per token
            tokens += energy.numel()
            for b, q_layer in quantized.items():
                err[b] += float(((runner.forward(q_layer, x) - y).double().square().sum(dim=-1) / energy).sum())
        if meter is not None:
            meter.remove()
            row = {b: meter.relative(b) if kind == "variance" else meter.absolute(b) for b in widths}
        else:
            row = {b: err[b] / tokens for b in widths}
        row[Bits.B16] = 0.0
        values.append(row)
        runner.advance(outputs)
        log.info("indicator_layer", layer=index, kind=kind, **{f"b{b.count}": v for b, v in row.items() if b.quantized})
    windows, width = runner.hidden.shape[0], runner.width
    return IndicatorTable(
        model_name or runner.model_dir.name, kind, group_size, tuple(values), windows, width, windows * width,
        meta=_meta(method, settings) if kind == "direct" else {},  # the variance kinds use no quantizer
    )


def _checked(bits, kind: str, method: str, around, measure, stride: int,
             confidence: float | None) -> tuple[list[Bits], Bits, float]:
    """The quantized widths to rate, the reference width and the confidence, or an InvalidArgument."""
    if kind not in KINDS:
        raise InvalidArgument(f"indicator kind must be one of {KINDS}, got {kind!r}")
    if method not in METHODS:
        raise InvalidArgument(f"indicator method must be rtn or gptq, got {method!r}")
    widths = [b for b in parse_bits_list(bits) if b.quantized]
    if not widths:
        raise InvalidArgument("give at least one of 8, 6, 5, 4, 3, 2 bits to rate")
    around = Bits.parse(around)
    if kind != "kl" and (around.quantized or measure is not None or stride != 1):
        raise InvalidArgument("--around, --holdout and --stride apply to the kl kind only; add --kind kl")
    if confidence is None:
        return widths, around, 1.0
    if not around.quantized:
        raise InvalidArgument("--confidence charges moves away from a reference width; add --kind kl --around 4")
    if confidence < 0 or not math.isfinite(confidence):
        raise InvalidArgument(f"confidence is a number of standard errors, at least 0, got {confidence}")
    return widths, around, confidence


def _kl_table(runner: LayerwiseRunner, widths, group_size: int, model_name: str, method: str,
              settings: GptqSettings, around: Bits, windows: torch.Tensor, stride: int,
              confidence: float) -> IndicatorTable:
    model, calibration = runner.model_dir, runner if method == "gptq" else None
    run = dict(method=method, micro_batch=runner.micro_batch, dtype=runner.dtype, device=runner.device, stride=stride)
    meta = _meta(method, settings)
    if not around.quantized:
        variants = quantized_variants(model, widths, method, group_size, calibration, settings)
        damage = measure_damage(model, windows, variants, **run)
        means = {b: damage[b].mean_kl() for b in widths}
        rows = [{b: means[b][i] for b in widths} for i in range(runner.num_layers)]
    else:
        base, variants = around_variants(model, {*widths, Bits.B16, around}, around, method, group_size,
                                         calibration, settings)
        damage = measure_damage(model, windows, variants, base=(around, base), **run)
        rows, errors = _around_rows(damage, around, confidence)
        meta |= {"around": around.count, "around_kl": damage[around].mean_kl()[0], "confidence": confidence,
                 "stderr": [{str(b.count): e for b, e in sorted(row.items())} for row in errors]}
    if stride != 1 or windows is not runner.windows:
        meta |= {"stride": stride, "calibration_windows": int(runner.windows.shape[0])}
    values = tuple({Bits.B16: 0.0, **{b: max(v, 0.0) for b, v in row.items()}} for row in rows)
    positions = next(iter(damage.values())).tokens
    return IndicatorTable(model_name or runner.model_dir.name, "kl", group_size, values, windows.shape[0],
                          windows.shape[1], positions, meta=meta)


def _around_rows(damage: dict, around: Bits, confidence: float) -> tuple[list[dict], list[dict]]:
    """Per layer, each width's value (16 bits: 0) and the standard error of its per-window mean KL
    difference from ``around``; every width but ``around`` is charged ``confidence`` such errors."""
    base, rows, errors = damage[around], [], []
    for i in range(base.num_layers):
        charged, error = {around: 0.0}, {}
        for b in (b for b in damage if b != around):
            diffs = [(x - y) / base.positions for x, y in zip(damage[b].kl[i], base.kl[i])]
            error[b] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            charged[b] = statistics.fmean(diffs) + confidence * error[b]
        rows.append({b: c - charged[Bits.B16] for b, c in charged.items() if b != Bits.B16})
        errors.append(error)
    return rows, errors


def _meta(method: str, settings: GptqSettings) -> dict:
    """What the indicator measured with, kept in its file."""
    return {"method": method, **({"gptq": dataclasses.asdict(settings)} if method == "gptq" else {})}
