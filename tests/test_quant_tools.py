"""`pqmesh indicator` and `pqmesh ppl` on tiny models and a small committed text file."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_checkpoint

from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.quant import commands
from pqmesh.quant.calibrate import LayerwiseRunner, bos_token, load_tokens, token_windows
from pqmesh.quant.indicator import NoiseMeter, column_noise, compute_indicator
from pqmesh.quant.indicator_file import load_indicator
from pqmesh.quant.qlinear import quantize_weight
from pqmesh.types import Bits

TEXT = Path(__file__).parent / "data" / "quant_text.txt"


def last_json_line(text: str) -> dict:
    lines = text.strip().splitlines()  # logs may share stdout when structlog is unconfigured
    return json.loads(lines[-2] if not lines[-1].startswith("{") else lines[-1])


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module", params=["llama", "opt", "bloom"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"tools-{request.param}")
    return directory, build_checkpoint(request.param, directory, layers=3)


def test_indicator_file_shape_and_monotone(tiny, tmp_path):
    directory, _ = tiny
    out = tmp_path / "ind.json"
    assert cli(["indicator", "--model", str(directory), "--calib", str(TEXT), "--out", str(out),
                "--samples", "5", "--seq-len", "48", "--batch", "2", "--group-size", "32"]) == 0
    data = json.loads(out.read_text())
    assert data["version"] == 1 and data["kind"] == "variance" and data["group_size"] == 32
    assert data["samples"] == 5 and data["tokens"] == 5 * 48
    assert [row["layer"] for row in data["layers"]] == [0, 1, 2]
    for row in data["layers"]:
        values = {int(k): v for k, v in row["bits"].items()}
        assert set(values) == {16, 8, 4, 3, 2}
        assert values[16] == 0.0 and all(v >= 0 for v in values.values())
        assert values[2] > values[3] > values[4] > values[8] > 0
    table = load_indicator(out)
    assert table.num_layers == 3 and table.value(1, Bits.B4) == data["layers"][1]["bits"]["4"]
    assert table.value(2, "16") == 0.0


@pytest.mark.parametrize("kind", ["direct", "variance-abs"])
def test_other_indicator_kinds_are_monotone(tmp_path, kind):
    build_checkpoint("opt", tmp_path, layers=2)
    windows = token_windows(load_tokens(tmp_path, TEXT), 40, 4)
    table = compute_indicator(LayerwiseRunner(tmp_path, windows, micro_batch=3), kind=kind, group_size=32)
    assert table.kind == kind and table.num_layers == 2
    assert table.meta == ({"method": "rtn"} if kind == "direct" else {})  # what it measured with
    for layer in range(2):
        v = [table.value(layer, b) for b in (2, 3, 4, 8)]
        assert v[0] > v[1] > v[2] > v[3] > 0


def test_noise_means_are_over_all_tokens(tmp_path):
    build_checkpoint("llama", tmp_path, layers=1)
    windows = token_windows(load_tokens(tmp_path, TEXT), 32, 5)
    widths = [Bits.B8, Bits.B4]

    def meter(micro_batch):
        runner = LayerwiseRunner(tmp_path, windows, micro_batch=micro_batch)
        layer = runner.load_layer(0)
        m = NoiseMeter(layer, widths, 32)
        inputs = {}
        grab = layer.self_attn.q_proj.register_forward_pre_hook(lambda mod, a: inputs.setdefault("q", []).append(a[0]))
        for part in runner.batches():
            runner.forward(layer, runner.hidden[part])
            m.close_batch(runner.hidden[part])
        m.remove()
        grab.remove()
        return layer, m, torch.cat(inputs["q"]).reshape(-1, 64)

    layer, uneven, x = meter(3)  # micro-batches of 3 and 2 windows
    _, whole, _ = meter(5)
    assert uneven.tokens == whole.tokens == 5 * 32
    for b in widths:
        assert uneven.absolute(b) == pytest.approx(whole.absolute(b), rel=1e-9)
        assert uneven.relative(b) == pytest.approx(whole.relative(b), rel=1e-9)
    # the q/k/v inputs are the same tensor: their share is sum_j c_j * E[x_j^2] with one global mean
    second_moment = x.double().square().mean(dim=0)
    qkv = sum(
        float(column_noise(getattr(layer.self_attn, n).weight, Bits.B4, 32).double() @ second_moment)
        for n in ("q_proj", "k_proj", "v_proj")
    )
    assert qkv < uneven.absolute(Bits.B4)
    assert uneven.absolute(Bits.B4) > uneven.absolute(Bits.B8) > 0


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_variance_estimate_matches_realized_error(bits):
    torch.manual_seed(bits)
    weight, x = torch.randn(256, 512), torch.randn(4096, 512) * torch.linspace(0.2, 3.0, 512)
    q = quantize_weight(weight, bits, 128)
    realized = ((x @ (q.dequantize() - weight).T) ** 2).sum(dim=1).mean().item()
    x2 = (x ** 2).mean(dim=0).view(-1, 128).sum(dim=1).double()
    predicted = float((q.scale.double() ** 2 @ x2).sum()) / 12
    assert 0.6 < realized / predicted < 1.4, f"{bits} bits: realized {realized:.4g}, predicted {predicted:.4g}"


def test_indicator_loader_rejects_bad_files(tmp_path):
    with pytest.raises(NotFound, match="pqmesh indicator"):
        load_indicator(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 2, "kind": "variance", "layers": []}))
    with pytest.raises(InvalidArgument, match="version 2"):
        load_indicator(bad)
    bad.write_text(json.dumps({"version": 1, "kind": "variance", "layers": [{"layer": 0, "bits": {"4": -1.0}}]}))
    with pytest.raises(InvalidArgument, match="negative"):
        load_indicator(bad)


def test_ppl_at_sixteen_bits_equals_hugging_face(tiny, capsys):
    directory, model = tiny
    assert (
        cli(
            [
                "ppl",
                "--model",
                str(directory),
                "--bits",
                "16",
                "--text",
                str(TEXT),
                "--seq-len",
                "64",
                "--max-tokens",
                "600",
            ]
        )
        == 0
    )
    result = last_json_line(capsys.readouterr().out)
    assert result["windows"] == 9 and result["tokens"] == 9 * 63 and result["bits"] == "16"
    windows = token_windows(list(TEXT.read_bytes())[:600], 64)
    with torch.no_grad():
        nll = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_ppl_mixed_plan_from_json_file(tmp_path, capsys):
    build_checkpoint("bloom", tmp_path, layers=3)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"bits": [16, 4, 2]}))
    assert (
        cli(
            [
                "ppl",
                "--model",
                str(tmp_path),
                "--bits",
                str(plan),
                "--text",
                str(TEXT),
                "--seq-len",
                "32",
                "--group-size",
                "32",
                "--max-tokens",
                "256",
            ]
        )
        == 0
    )
    result = last_json_line(capsys.readouterr().out)
    assert result["bits"] == "16,4,2" and math.isfinite(result["ppl"]) and result["ppl"] > 1
    with pytest.raises(InvalidArgument, match="one per layer"):
        cli(["ppl", "--model", str(tmp_path), "--bits", "16,4", "--text", str(TEXT)])


def test_windows_start_with_bos_only_when_the_tokenizer_adds_one(tmp_path):
    tokens = list(range(10, 40))
    plain = token_windows(tokens, 8)
    assert plain.shape == (3, 8) and plain[1, 0] == 18
    with_bos = token_windows(tokens, 8, bos=2)
    assert with_bos.shape == (4, 8) and (with_bos[:, 0] == 2).all()
    assert with_bos[1, 1:].tolist() == list(range(17, 24))  # 7 text tokens per window, none skipped
    assert token_windows(tokens, 8, count=2, bos=2).shape == (2, 8)
    build_checkpoint("llama", tmp_path, layers=1)  # no tokenizer files: byte ids, no BOS
    assert bos_token(tmp_path) is None



def test_long_jobs_log_progress_per_layer_by_default(tmp_path):
    """`pqmesh indicator` (like quantize, ppl, model prepare) shows one line per layer unless told
    otherwise; short commands stay at warning. Real processes: structlog caches its level per process."""
    build_checkpoint("llama", tmp_path / "m", layers=3)
    argv = ["indicator", "--model", str(tmp_path / "m"), "--calib", str(TEXT), "--out", str(tmp_path / "i.json"),
            "--samples", "2", "--seq-len", "32", "--group-size", "32"]

    def stderr(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert stderr(*argv).count("indicator_layer") == 3
    assert "indicator_layer" not in stderr("--log-level", "warning", *argv)
