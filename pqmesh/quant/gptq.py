"""Calibrated (GPTQ-style) quantization of one linear layer into the same group-wise format as
round-to-nearest (`pqmesh.quant.qlinear.QuantizedWeight`).

GPTQ (Frantar et al., 2023) quantizes the columns (input channels) of ``W [out, in]`` one at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
of the input Hessian ``H = sum_t x_t x_t^T`` of calibration activations: it minimizes the output
error ``||W X - Q X||^2`` on those activations instead of the weight error ``||W - Q||^2``.

What this implementation keeps fixed, so kernels, memory model and planner see no difference:
groups of ``g`` consecutive input channels per output row, an fp16 ``scale`` and fp16 ``offset`` per
group chosen before its codes, codes ``0 .. 2**bits - 1``. A group's range is chosen when GPTQ
reaches the group's first column, from the group's weights *as updated by the error compensation so
far*, with the same clipping search as round-to-nearest. Blocks of the lazy batch update are exactly
one group, so that range sees every update from the columns before it.

*Damping*: ``H += damp * mean(diag H) * I`` (default 1%) keeps the Cholesky factorization stable for
channels the calibration barely excites; channels it never excites (``H_jj = 0``) get ``H_jj = 1``.

*Act-order* (optional): columns are visited in decreasing ``H_jj`` (the most active inputs first,
while there is most freedom left to compensate them). Visiting out of order would make a group's
range depend on columns of other groups, so with act-order every group's range is fixed up front
from the original weights ("static groups"); the stored format is unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from pqmesh.errors import InvalidArgument
from pqmesh.quant.qlinear import (
    CLIP_SHRINK,
    CLIP_STEPS,
    SCALE_DTYPE,
    QuantizedWeight,
    clipped_range,
    effective_group_size,
)
from pqmesh.types import Bits

DEFAULT_DAMP = 0.01


class HessianAccumulator:
    """The running mean of ``x_t x_t^T`` over every calibration token a linear sees (float32, each
    micro-batch's sum folded in with weight ``n / total``, as GPTQ does, so the scale stays bounded)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.value = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        total = self.tokens + flat.shape[0]
        self.value.mul_(self.tokens / total).addmm_(flat.T, flat, alpha=1.0 / total)
        self.tokens = total

    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise InvalidArgument("no calibration tokens reached this linear; give a calibration text")
        return self.value


def _group_params(w: torch.Tensor, bits: Bits, steps: int,
                  importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, offset) per row for a group of weights ``w [out, g]`` (round-to-nearest's rule;
    with ``importance [g]``, the clipping search weighs each column's squared error by it)."""
    low, high = clipped_range(w.unsqueeze(1), bits.levels, steps, CLIP_SHRINK, importance)
    scale = ((high - low) / bits.levels).squeeze(1).to(SCALE_DTYPE)
    offset = low.squeeze(1).to(SCALE_DTYPE)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise InvalidArgument("weights exceed the fp16 range of quantization scales; keep this layer at 16 bits")
    return scale, offset


def _round(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: int) -> tuple[torch.Tensor, ...]:
    """(codes, dequantized values) of one column ``w [out]`` on a grid given per row."""
    step = scale.float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((w - offset.float()) / safe).round_().clamp_(0, levels)
    return codes, codes * step + offset.float()


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping (what GPTQ's column updates use)."""
    h = hessian.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean().clamp_min(1e-12)))
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as err:  # numerically indefinite after damping
        raise InvalidArgument(f"the calibration Hessian is not positive definite at damping {damp}; "
                              "raise --damp (e.g. 0.1) or give more calibration text") from err
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: Bits | int | str,
    group_size: int = 128,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    clip_steps: int | None = None,
    hessian_clip: bool = False,
) -> QuantizedWeight:
    """Calibrated quantization of ``weight [out, in]`` given the mean input Hessian ``[in, in]``.

    ``hessian_clip``: each group's clipping search weighs a column's squared error by its ``H_jj``
    (the output error a lone rounding error there causes) instead of equally."""
    bits = Bits.parse(bits)
    if not bits.quantized:
        raise InvalidArgument("16-bit weights are kept as they are; quantize to 8, 4, 3 or 2 bits")
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
        raise InvalidArgument(f"weight {tuple(weight.shape)} needs a Hessian [{weight.shape[-1]}, {weight.shape[-1]}], "
                              f"got {tuple(hessian.shape)}")
    if not 0 <= damp < 1:
        raise InvalidArgument(f"damping is a fraction of the mean Hessian diagonal in [0, 1), got {damp}")
    rows, cols = weight.shape
    group = effective_group_size(cols, group_size)
    steps = clip_steps if clip_steps is not None else (1 if bits.count >= 8 else CLIP_STEPS)
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale = torch.empty(rows, cols // group, dtype=SCALE_DTYPE, device=w.device)
    offset = torch.empty_like(scale)
    importance = h.diagonal().clone() if hessian_clip else None
    if act_order:
        for g in range(cols // group):
            cut = slice(g * group, (g + 1) * group)
            weights = None if importance is None else importance[cut]
            scale[:, g], offset[:, g] = _group_params(w[:, cut], bits, steps, weights)
        order = torch.argsort(h.diagonal(), descending=True)
    else:
        order = torch.arange(cols, device=w.device)
    w, h = w[:, order], h[order][:, order]
    with _one_thread():
        codes = _compensate(w, _inverse_factor(h, damp), order, scale, offset, bits, group, steps, act_order,
                            importance)
    inverse = torch.argsort(order)
    return QuantizedWeight(codes[:, inverse].to(torch.uint8).contiguous(), scale, offset, group, bits)


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of small ops: run it on one intra-op thread. With two OpenMP
    threads on a busy 2-core host a 576x256 matrix took 2.7 s against 0.044 s on one (barrier spins)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compensate(w, hinv, order, scale, offset, bits, group, steps, static, importance=None) -> torch.Tensor:
    """GPTQ's column loop over ``w`` (columns in visiting ``order``), in blocks of one group; fills
    ``scale``/``offset`` per group on first visit unless ``static``. Returns codes in visiting order."""
    rows, cols = w.shape
    codes = torch.empty(rows, cols, device=w.device)
    groups = order // group
    for first in range(0, cols, group):
        last = min(first + group, cols)
        block, err = w[:, first:last].clone(), torch.empty(rows, last - first, device=w.device)
        hblock = hinv[first:last, first:last]
        if not static:  # in order: this block is exactly the group first // group
            g = first // group
            scale[:, g], offset[:, g] = _group_params(block, bits, steps,
                                                      None if importance is None else importance[first:last])
        for i in range(last - first):
            g = int(groups[first + i])
            column = block[:, i]
            q, value = _round(column, scale[:, g], offset[:, g], bits.levels)
            codes[:, first + i] = q
            e = (column - value) / hblock[i, i]
            block[:, i:] -= e.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, last:] -= err @ hinv[first:last, last:]
    return codes
