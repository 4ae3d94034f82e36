"""The calibrated (GPTQ-style) quantizer: same storage format as round-to-nearest, lower output error
on inputs it was not calibrated on, for one linear and for a whole decoder layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quant_tiny import build_wide_checkpoint

from pqmesh.errors import InvalidArgument
from pqmesh.quant.calibrate import LayerwiseRunner, calibration_windows
from pqmesh.quant.calibrated import GptqSettings, advance_through, gptq_layer
from pqmesh.quant.gptq import HessianAccumulator, gptq_quantize_weight
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.layer import linear_children, quantize_layer
from pqmesh.quant.qlinear import QuantLinear, clipped_range, quantize_weight

TEXT = Path(__file__).parent / "data" / "quant_text.txt"


def activations(n: int, features: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few loud channels, like a transformer's (one fixed mixing)."""
    mix = torch.Generator().manual_seed(99)
    basis = torch.randn(features, features, generator=mix) / features**0.5
    loud = torch.ones(features)
    loud[torch.randperm(features, generator=mix)[:8]] = 10.0
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=gen) @ basis) * loud


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x @ (approx - weight).T).norm() / (x @ weight.T).norm())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [8, 5, 4, 3, 2])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(bits, act_order):
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = HessianAccumulator(256)
    hessian.add(activations(2048, 256, seed=2))
    held_out = activations(1024, 256, seed=3)
    rtn = quantize_weight(weight, bits, 128)
    gptq = gptq_quantize_weight(weight, hessian.mean(), bits, 128, act_order=act_order)
    rtn_err = output_error(held_out, weight, rtn.dequantize())
    gptq_err = output_error(held_out, weight, gptq.dequantize())
    assert gptq_err < 0.9 * rtn_err, f"{bits} bits: gptq {gptq_err:.4f} vs rtn {rtn_err:.4f}"
    # the same format: codes in range, fp16 groups of 128 along the input, same module
    assert gptq.codes.dtype == torch.uint8 and int(gptq.codes.max()) <= (1 << bits) - 1
    assert gptq.scale.dtype == torch.float16 and gptq.scale.shape == rtn.scale.shape == (96, 2)
    module = QuantLinear.from_quantized(gptq, None, torch.float32)
    assert torch.allclose(module(held_out[:4]), held_out[:4] @ gptq.dequantize().T, atol=1e-5)
    assert torch.equal(module.quantized().codes, gptq.codes)


def test_gptq_refuses_bad_inputs():
    weight = torch.randn(8, 32)
    with pytest.raises(InvalidArgument, match="unknown bitwidth"):
        gptq_quantize_weight(weight, torch.eye(32), 7, 32)
    with pytest.raises(InvalidArgument, match="Hessian"):
        gptq_quantize_weight(weight, torch.eye(16), 4, 32)
    with pytest.raises(InvalidArgument, match="16-bit"):
        gptq_quantize_weight(weight, torch.eye(32), 16, 32)
    with pytest.raises(InvalidArgument, match="no calibration tokens"):
        HessianAccumulator(32).mean()


def test_channels_the_calibration_never_excites_are_zeroed_not_nan():
    x = activations(512, 64, seed=4)
    x[:, :5] = 0.0
    hessian = HessianAccumulator(64)
    hessian.add(x)
    q = gptq_quantize_weight(torch.randn(16, 64), hessian.mean(), 3, 32)
    assert torch.isfinite(q.dequantize()).all()


def test_calibrated_decoder_layer_has_lower_output_error_than_rtn(tmp_path):
    build_wide_checkpoint("llama", tmp_path, layers=1, hidden=256)
    windows = calibration_windows(tmp_path, TEXT, 12, 96)
    calib, held_out = windows[:8], windows[8:]
    runner = LayerwiseRunner(tmp_path, calib, micro_batch=4)
    reference = LayerwiseRunner(tmp_path, held_out, micro_batch=4)
    try:
        gptq = gptq_layer(runner, runner.load_layer(0), 3, 128)
        rtn = quantize_layer(reference.load_layer(0), 3, 128)
        assert len(linear_children(gptq)) == 0  # every linear swapped
        x = reference.hidden
        exact = reference.forward(reference.load_layer(0), x)
        err = {name: float((reference.forward(m, x) - exact).norm() / (exact - x).norm())
               for name, m in (("gptq", gptq), ("rtn", rtn))}
        assert err["gptq"] < 0.9 * err["rtn"], err
        advance_through(runner, gptq)  # the quantized layer's outputs feed the next layer
        assert runner.hidden.shape == (8, 96, 256)
    finally:
        runner.close()
        reference.close()


def test_direct_indicator_of_the_calibrated_quantizer_is_lower(tmp_path):
    build_wide_checkpoint("llama", tmp_path, layers=2, hidden=256)
    windows = calibration_windows(tmp_path, TEXT, 8, 96)
    tables = {}
    for method in ("rtn", "gptq"):
        runner = LayerwiseRunner(tmp_path, windows, micro_batch=4)
        tables[method] = compute_indicator(runner, (4, 3), "direct", 128, method=method)
        runner.close()
    for layer in range(2):
        for bits in (4, 3):
            assert 0 < tables["gptq"].value(layer, bits) < tables["rtn"].value(layer, bits)
    with pytest.raises(InvalidArgument, match="rtn or gptq"):
        compute_indicator(LayerwiseRunner(tmp_path, windows), (4,), "direct", 128, method="awq")


def test_true_sequential_quantizes_linears_in_forward_order_on_quantized_inputs(tmp_path):
    """True-sequential collects the Hessians again after each input's linears: one pass per input
    (q/k/v, o, gate/up, down), the output projection calibrated on the quantized attention."""
    build_wide_checkpoint("llama", tmp_path, layers=1, hidden=256)
    windows = calibration_windows(tmp_path, TEXT, 12, 96)
    runner = LayerwiseRunner(tmp_path, windows[:8], micro_batch=4)
    reference = LayerwiseRunner(tmp_path, windows[8:], micro_batch=4)
    passes = []
    forward = runner.forward
    runner.forward = lambda layer, x: passes.append(1) or forward(layer, x)
    try:
        plain = gptq_layer(runner, runner.load_layer(0), 3, 128)
        one_pass = len(passes)
        sequential = gptq_layer(runner, runner.load_layer(0), 3, 128, GptqSettings(true_sequential=True))
        assert one_pass == 2 and len(passes) - one_pass == 4 * 2  # 2 micro-batches per pass
        assert len(linear_children(sequential)) == 0
        codes = {n: m.quantized().codes for n, m in sequential.named_modules() if isinstance(m, QuantLinear)}
        same = {n: torch.equal(c, m.quantized().codes) for n, m in plain.named_modules()
                if isinstance(m, QuantLinear) for c in [codes[n]]}
        assert same["self_attn.q_proj"] and same["self_attn.v_proj"]  # the first input is the same
        assert not same["self_attn.o_proj"] and not same["mlp.down_proj"]  # later inputs are not
        x = reference.hidden
        exact = reference.forward(reference.load_layer(0), x)
        err = {name: float((reference.forward(m, x) - exact).norm() / (exact - x).norm())
               for name, m in (("plain", plain), ("sequential", sequential))}
        assert err["sequential"] < 1.1 * err["plain"], err
    finally:
        runner.close()
        reference.close()


def test_hessian_weighted_clipping_favours_the_loud_columns():
    """With ``hessian_clip`` each group's range is chosen for the output error: on inputs whose
    loud channels dominate, the held-out output error is no worse than with plain clipping."""
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.05
    hessian = HessianAccumulator(256)
    hessian.add(activations(2048, 256, seed=6))
    held_out = activations(1024, 256, seed=7)
    err = {}
    for weighted in (False, True):
        q = gptq_quantize_weight(weight, hessian.mean(), 3, 128, act_order=True, hessian_clip=weighted)
        err[weighted] = output_error(held_out, weight, q.dequantize())
    assert err[True] <= 1.02 * err[False], err
    low, high = clipped_range(torch.tensor([[0.0, 0.1, 0.2, 1.0]]), 1, 16, 0.5, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    plain_low, plain_high = clipped_range(torch.tensor([[0.0, 0.1, 0.2, 1.0]]), 1, 16, 0.5)
    assert float(high - low) < float(plain_high - plain_low)  # an unimportant outlier no longer sets the range
