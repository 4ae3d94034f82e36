"""Measured per-layer damage (`pqmesh.quant.sensitivity`) and the `kl` indicator, on tiny random
models: the damage agrees with `perplexity` of the same single-layer plan, a 16-bit "variant" does
no damage, and the indicator orders widths and quantizers as it should."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from quant_tiny import build_wide_checkpoint

from cli.main import main as cli
from pqmesh.errors import InvalidArgument
from pqmesh.quant.calibrate import LayerwiseRunner, calibration_windows
from pqmesh.quant.calibrated import GptqSettings
from pqmesh.quant.indicator import compute_indicator
from pqmesh.quant.indicator_file import load_indicator
from pqmesh.quant.ppl import perplexity
from pqmesh.quant.quantize import quantize_checkpoint
from pqmesh.quant.rank import spearman
from pqmesh.quant.sensitivity import around_variants, measure_damage, quantized_variants
from pqmesh.types import Bits

TEXT = Path(__file__).parent / "data" / "quant_text.txt"


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wide")
    build_wide_checkpoint("llama", directory, layers=2, hidden=256)
    return directory


def test_damage_matches_perplexity_of_the_single_layer_plan(wide):
    windows = calibration_windows(wide, TEXT, 6, 64)
    variants = quantized_variants(wide, (3,), "rtn", 128)
    damage = measure_damage(wide, windows, variants, micro_batch=4)[Bits.B3]  # 4 + 2: a ragged last batch
    assert (damage.num_layers, damage.windows, damage.tokens) == (2, 6, 6 * 63)
    base = perplexity(wide, [16, 16], windows, 128, batch=3).nll
    for layer in range(2):
        plan = [3 if i == layer else 16 for i in range(2)]
        expected = perplexity(wide, plan, windows, 128, batch=3).nll - base
        assert damage.mean_nll()[layer] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert all(v > 0 for v in damage.kl[layer])
    assert -1.0 <= damage.split_half() <= 1.0
    row = damage.to_json()
    assert row["bits"] == 3 and len(row["kl_per_window"][0]) == 6 and row["tokens"] == 378


def test_a_16_bit_variant_does_no_damage(wide):
    windows = calibration_windows(wide, TEXT, 2, 64)
    runner = LayerwiseRunner(wide, windows)
    variants = {Bits.B8: [runner.load_layer(i) for i in range(2)]}  # unquantized layers posing as 8-bit
    runner.close()
    damage = measure_damage(wide, windows, variants, micro_batch=2)[Bits.B8]
    assert max(map(abs, damage.mean_kl())) < 1e-6
    assert max(map(abs, damage.mean_nll())) < 1e-4


def test_kl_indicator_orders_widths_and_quantizers(wide, tmp_path):
    windows = calibration_windows(wide, TEXT, 4, 64)
    tables = {}
    for method in ("rtn", "gptq"):
        runner = LayerwiseRunner(wide, windows, micro_batch=4)
        tables[method] = compute_indicator(runner, (8, 4, 3, 2), "kl", 128, method=method)
        runner.close()
    for layer in range(2):
        rtn = [tables["rtn"].value(layer, b) for b in (8, 4, 3, 2)]
        assert 0 < rtn[0] < rtn[1] < rtn[2] < rtn[3]
        assert tables["gptq"].value(layer, 3) < tables["rtn"].value(layer, 3)
    assert tables["gptq"].kind == "kl"
    assert tables["gptq"].meta == {"method": "gptq", "gptq": dataclasses.asdict(GptqSettings())}
    assert tables["rtn"].tokens == 4 * 63  # scored positions


def test_cli_writes_a_kl_indicator_the_loader_reads(wide, tmp_path):
    out = tmp_path / "kl.json"
    assert cli(["indicator", "--model", str(wide), "--calib", str(TEXT), "--out", str(out), "--kind", "kl",
                "--method", "gptq", "--bits", "4,3", "--samples", "2", "--seq-len", "64", "--no-hessian-clip"]) == 0
    table = load_indicator(out)
    assert (table.kind, table.num_layers, table.samples, table.seq_len) == ("kl", 2, 2, 64)
    written = json.loads(out.read_text())
    assert written["method"] == "gptq" and written["gptq"]["hessian_clip"] is False  # what it measured with
    assert table.value(0, 3) > table.value(0, 4) > 0


def test_damage_around_a_width_matches_perplexity_of_the_plan(wide):
    """RTN around 4 bits: layer i's damage at b is the plan with i at b and the rest at 4; the base
    entry is uniform 4 bits itself; the 16-bit variant undoes only its own layer."""
    windows = calibration_windows(wide, TEXT, 4, 64)
    base, variants = around_variants(wide, (3, 16), 4)
    damage = measure_damage(wide, windows, variants, base=(Bits.B4, base), micro_batch=3)
    assert set(damage) == {Bits.B3, Bits.B16, Bits.B4}
    nll16 = perplexity(wide, [16, 16], windows, 128, batch=4).nll
    for b in (3, 16):
        for layer in range(2):
            plan = [b if i == layer else 4 for i in range(2)]
            expected = perplexity(wide, plan, windows, 128, batch=4).nll - nll16
            assert damage[Bits.parse(b)].mean_nll()[layer] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    uniform4 = perplexity(wide, [4, 4], windows, 128, batch=4).nll - nll16
    assert damage[Bits.B4].mean_nll() == pytest.approx([uniform4, uniform4], rel=1e-3, abs=1e-6)
    assert all(damage[Bits.B3].mean_kl()[i] > damage[Bits.B4].mean_kl()[i] > damage[Bits.B16].mean_kl()[i] > 0
               for i in range(2))


def test_gptq_around_a_width_is_the_uniform_checkpoint(wide, tmp_path):
    """The base is what `pqmesh quantize` writes at uniform 4, and the last layer's 3-bit variant is
    the checkpoint of plan [4, 3] (the layers before it calibrate the same way); measured on held-out windows."""
    windows = calibration_windows(wide, TEXT, 6, 64)
    calib, held_out = windows[:4], windows[4:]
    settings = GptqSettings(hessian_clip=False)
    base, variants = around_variants(wide, (3,), 4, "gptq", 128, LayerwiseRunner(wide, calib), settings)
    damage = measure_damage(wide, held_out, variants, "gptq", base=(Bits.B4, base))
    nll16 = perplexity(wide, [16, 16], held_out, 128).nll
    for plan, table, layer in (([4, 4], damage[Bits.B4], 0), ([4, 3], damage[Bits.B3], 1)):
        out = tmp_path / "-".join(map(str, plan))
        quantize_checkpoint(wide, out, plan, "gptq", calib, 128, settings)
        expected = perplexity(out, plan, held_out, 128).nll - nll16
        assert table.mean_nll()[layer] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_a_stride_scores_every_stride_th_position(wide):
    """Scoring only position 0 of 64-token windows (stride 63) is the damage of 2-token windows:
    attention is causal, so position 0 sees token 0 only."""
    windows = calibration_windows(wide, TEXT, 3, 64)
    variants = quantized_variants(wide, (3,), "rtn", 128)
    strided = measure_damage(wide, windows, variants, stride=63)[Bits.B3]
    short = measure_damage(wide, windows[:, :2].contiguous(), variants)[Bits.B3]
    assert (strided.positions, strided.tokens, short.positions) == (1, 3, 1)
    flat = [v for row in short.kl for v in row]
    assert [v for row in strided.kl for v in row] == pytest.approx(flat, rel=1e-4, abs=1e-7)
    assert measure_damage(wide, windows, variants, stride=2)[Bits.B3].positions == 32
    with pytest.raises(InvalidArgument, match="stride must be at least 1"):
        measure_damage(wide, windows, variants, stride=0)


def test_kl_indicator_around_a_width(wide, tmp_path, capsys):
    """Values are KL(layer at b) - KL(layer at 16) with the rest at 4 bits; the file says so. By default
    each move away from 4 bits is charged one standard error of its window-to-window difference."""
    out, plain = tmp_path / "around.json", tmp_path / "plain.json"
    argv = ["indicator", "--model", str(wide), "--calib", str(TEXT), "--kind", "kl", "--bits", "5,3",
            "--around", "4", "--samples", "2", "--holdout", "3", "--seq-len", "64", "--stride", "2"]
    assert cli([*argv, "--out", str(out)]) == 0 and cli([*argv, "--out", str(plain), "--confidence", "0"]) == 0
    table, means = load_indicator(out), load_indicator(plain)
    assert (table.samples, table.tokens) == (3, 3 * 32)  # measured on the 3 held-out windows
    assert table.meta["around"] == 4 and table.meta["calibration_windows"] == 2 and table.meta["stride"] == 2
    assert table.meta["confidence"] == 1.0 and means.meta["confidence"] == 0.0
    windows = calibration_windows(wide, TEXT, 5, 64)[2:]
    base, variants = around_variants(wide, (5, 3, 16), 4)
    damage = measure_damage(wide, windows, variants, base=(Bits.B4, base), stride=2)
    for layer in range(2):
        four = torch.tensor(damage[Bits.B4].kl[layer]) / 32
        diff = {b: torch.tensor(damage[Bits.parse(b)].kl[layer]) / 32 - four for b in (16, 5, 3)}
        stderr = {b: float(d.std() / 3 ** 0.5) for b, d in diff.items()}  # 3 windows, n - 1 in the variance
        assert table.meta["stderr"][layer] == pytest.approx({str(b): e for b, e in stderr.items()}, rel=1e-4)
        charged = {b: float(d.mean()) + stderr[b] for b, d in diff.items()} | {4: 0.0}
        for b in (5, 4, 3):
            expected = damage[Bits.parse(b)].mean_kl()[layer] - damage[Bits.B16].mean_kl()[layer]
            assert means.value(layer, b) == pytest.approx(max(expected, 0.0), rel=1e-4, abs=1e-9)
            assert table.value(layer, b) == pytest.approx(max(charged[b] - charged[16], 0.0), rel=1e-4, abs=1e-9)
        assert means.value(layer, 3) > means.value(layer, 4) > means.value(layer, 5)
    assert cli(["indicator", "--model", str(wide), "--calib", str(TEXT), "--out", str(out), "--around", "4",
                "--samples", "2", "--seq-len", "64"]) == 2
    assert "apply to the kl kind only" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="reference width must be a quantized one"):
        around_variants(wide, (3,), 16)
    assert cli(["indicator", "--model", str(wide), "--calib", str(TEXT), "--out", str(out), "--kind", "kl",
                "--samples", "2", "--holdout", "100000", "--seq-len", "64"]) == 2
    assert "calibration file" in capsys.readouterr().err
    assert cli([*argv, "--out", str(out), "--confidence", "-1"]) == 2
    assert "at least 0" in capsys.readouterr().err
    assert cli(["indicator", "--model", str(wide), "--calib", str(TEXT), "--out", str(out), "--kind", "kl",
                "--samples", "2", "--seq-len", "64", "--confidence", "2"]) == 2
    assert "add --kind kl --around 4" in capsys.readouterr().err


def test_bad_inputs_get_precise_errors(wide):
    with pytest.raises(InvalidArgument, match="method must be one of"):
        quantized_variants(wide, (4,), "awq")
    with pytest.raises(InvalidArgument, match="needs calibration windows"):
        quantized_variants(wide, (4,), "gptq")
    with pytest.raises(InvalidArgument, match="at least one of 8, 4, 3, 2"):
        quantized_variants(wide, (16,))
    windows = calibration_windows(wide, TEXT, 2, 32)
    one_layer = {Bits.B4: quantized_variants(wide, (4,))[Bits.B4][:1]}
    with pytest.raises(InvalidArgument, match="cover 1 layers, the model has 2"):
        measure_damage(wide, windows, one_layer)
    with pytest.raises(InvalidArgument, match="seq_len >= 2"):
        measure_damage(wide, torch.zeros(3, dtype=torch.long), one_layer)


def test_spearman_ranks_with_ties_and_refuses_short_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    with pytest.raises(InvalidArgument, match="one length >= 2"):
        spearman([1.0], [1.0])
