"""`pqmesh plan`: the JSON object of the issue, the readable table, and errors as exit code 2."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from planner.catalog import BUILTIN_CONFIGS

CLUSTER = """
[[device]]
type = "T4"
count = 2
host = "t4-node"
[[device]]
type = "V100-32G"
name = "v100"
host = "v100-node"
[network]
bandwidth_gbps = 10
latency_us = 100
"""


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER)
    return path


def _args(cluster, *extra):
    return ["plan", "--cluster", str(cluster), "--model", "opt-13b", "--batch", "16", "--prompt-len", "128",
            "--gen-len", "32", "--time-limit", "5", *extra]


def test_json_report(cluster, capsys):
    assert main(_args(cluster, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"plan", "predicted", "baselines", "solve_seconds", "optimality_gap"}
    stages = report["plan"]["stages"]
    assert {s["device"] for s in stages} == {"t4:0", "t4:1", "v100"}
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 40
    assert all(len(s["bits"]) == s["layers"][1] - s["layers"][0] for s in stages)
    assert 16 % report["plan"]["prefill_micro_batch"] == 0 and 16 % report["plan"]["decode_micro_batch"] == 0
    predicted = report["predicted"]
    assert predicted["throughput_tokens_per_s"] == pytest.approx(
        16 * 32 / (predicted["prefill_s"] + predicted["decode_s"])
    )
    assert len(predicted["memory_bytes"]) == len(stages)
    assert set(report["baselines"]) == {"pipeedge", "uniform_int8", "uniform_int4", "adabits"}
    for baseline in report["baselines"].values():
        assert "feasible" in baseline and "throughput_tokens_per_s" in baseline
        if baseline["feasible"]:
            assert baseline["throughput_tokens_per_s"] <= predicted["throughput_tokens_per_s"] * (1 + 1e-6)


def test_table_and_options(cluster, tmp_path, capsys):
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(BUILTIN_CONFIGS["llama-2-7b"]))
    args = _args(cluster, "--bits", "16,8,4", "--theta", "10")
    args[args.index("opt-13b")] = str(config.parent)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model" in out.splitlines()[0]  # the checkpoint directory names the model
    for word in ("stage", "device", "layers", "memory", "baseline", "pipeedge", "tokens/s"):
        assert word in out
    assert "3b" not in out and "2b" not in out  # only the allowed bitwidths


def test_errors_exit_2_with_a_message(cluster, tmp_path, capsys):
    assert main(_args(tmp_path / "missing.toml")) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err
    assert main(_args(cluster, "--quality-bound", "0.0001", "--bits", "8,4")) == 2
    assert "quality bound" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: theta and quality bound exclude each other
        main(_args(cluster, "--theta", "1", "--quality-bound", "1"))


def test_plot_writes_a_png_of_the_plan(cluster, tmp_path, capsys):
    import struct

    from planner.plot import DPI, FIGSIZE

    out = tmp_path / "plan.png"
    assert main(_args(cluster, "--json", "--plot", str(out))) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["stages"]  # the report is printed as before
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    assert len(data) > 50_000  # four panels of bars and text, not an empty canvas
    assert main(_args(cluster, "--plot", str(tmp_path / "missing" / "plan.png"))) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_plot_is_imported_lazily():
    import subprocess
    import sys

    code = "import sys, cli.main; cli.main.build_parser(); sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
