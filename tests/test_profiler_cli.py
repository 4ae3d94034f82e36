"""`pqmesh profile` on the CPU with a tiny Llama config: the profile JSON the planner takes, the cache,
held-out validation, RegisterDevice against a real planner, the link probe, and bad input."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from tiny_models import tiny_config

from cli.main import main
from planner.catalog import model_from_config_json
from planner.commands import _model_text
from planner.devices import DeviceProfile
from planner.latency import layer_seconds
from planner.main import PlannerConfig, start
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from pqmesh.grpc_server import channel
from pqmesh.types import Bits, Phase
from profiler.cache import ProfileCache
from profiler.grid import PRESETS
from profiler.run import ProfileRequest, profile, record_path
from profiler.target import resolve_device, resolve_model
from profiler.timing import TimingOptions

FAST = ["--quick", "--repeats", "1", "--layers", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core runner stall each other (10-100x slower calls); one
    thread keeps these tests fast. The thread count is part of the CPU's cache key."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("profiling") / "tiny-llama"
    tiny_config("llama", layers=4).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def profiled(model_dir, tmp_path_factory):
    """One quick profile at 16 and 4 bits, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("out") / "cpu.json"
    cache = out.parent / "cache"
    args = ["profile", "--model", str(model_dir), "--device", "cpu", "--bits", "16,4", "--out", str(out),
            "--name", "tiny-cpu", "--cache-dir", str(cache), *FAST]
    assert main(args) == 0
    return out, cache, args


def test_profile_is_what_the_planner_takes(profiled, model_dir, tmp_path, capsys):
    out, _, _ = profiled
    prof = DeviceProfile.from_json(out.read_text())
    assert prof.name == "tiny-cpu" and prof.device_type == "cpu" and prof.memory_bytes > 0
    assert {(int(m.bits), m.phase) for m in prof.latency} == {(b, p) for b in (16, 4) for p in Phase}
    assert all(c >= 0 for m in prof.latency for c in m.coefficients)
    # the planner names the shape as `pqmesh plan --model DIR` does, so it uses the fitted entries
    shape = model_from_config_json(_model_text(str(model_dir)))
    assert prof.model == shape.name
    for phase in Phase:
        fitted = prof.fitted(shape.name, Bits.B4, phase)
        assert fitted is not None
        assert layer_seconds(prof, shape, Bits.B4, phase, 1, 8, 9) == pytest.approx(
            fitted.seconds(1, 8 if phase == Phase.PREFILL else 1, 8 if phase == Phase.PREFILL else 9)
        )
        assert layer_seconds(prof, shape, Bits.B4, phase, 1, 8, 9) > 0
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[device]]\ntype = "cpu"\nname = "tiny-cpu"\n')
    capsys.readouterr()
    assert main(["plan", "--cluster", str(cluster), "--model", str(model_dir), "--batch", "4", "--prompt-len", "8",
                 "--gen-len", "4", "--bits", "16,4", "--profile", str(out), "--time-limit", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["stages"][0]["device"] == "tiny-cpu"
    record = json.loads(record_path(out).read_text())
    assert set(record["samples"]) == {"16", "4"} and record["device"] == "cpu"


def test_cache_hit_is_instant_and_keyed(profiled, model_dir):
    _, cache_dir, _ = profiled
    cache = ProfileCache(cache_dir)
    model, device = resolve_model(str(model_dir)), resolve_device("cpu")
    options = TimingOptions(layers=1, repeats=1)

    def request(bits, dtype=torch.float32):
        return ProfileRequest(model, device, dtype, bits, PRESETS["quick"], options, "tiny-cpu")

    started = time.perf_counter()
    again, record = profile(request((Bits.B16, Bits.B4)), cache)
    assert time.perf_counter() - started < 1.0
    assert record.cache_hits == (16, 4)
    _, other = profile(request((Bits.B16, Bits.B8)), cache)
    assert other.cache_hits == (16,)  # 8 bits was never measured
    assert other.samples[16] == record.samples[16]
    _, bf16 = profile(request((Bits.B16,), torch.bfloat16), cache)
    assert bf16.cache_hits == ()
    assert request((Bits.B16,)).layer_key(Bits.B16) != request((Bits.B16,), torch.bfloat16).layer_key(Bits.B16)


def test_validate_prints_finite_errors(profiled, capsys):
    out, _, _ = profiled
    capsys.readouterr()
    assert main(["profile", "validate", str(out), "--points", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["phase"], r["bits"]) for r in report["errors"]}
    assert rows == {(p, b) for p in ("prefill", "decode") for b in (16, 4)}
    assert all(math.isfinite(r["mean_ape_percent"]) and math.isfinite(r["max_ape_percent"]) for r in report["errors"])
    assert all(r["points"] == 2 for r in report["errors"])
    assert main(["profile", "validate", str(out), "--points", "1"]) == 0
    assert "mean APE" in capsys.readouterr().out


def test_register_with_a_running_planner(profiled, tmp_path, capsys):
    out, _, args = profiled
    server, port, _ = start(PlannerConfig("127.0.0.1:0", tmp_path / "state"))
    try:
        assert main([*args[:-len(FAST)], *FAST, "--register", f"127.0.0.1:{port}"]) == 0  # measured: cache hit
        assert "registered tiny-cpu" in capsys.readouterr().out
        with channel(f"127.0.0.1:{port}") as ch:
            listed = planner_pb2_grpc.PlannerServiceStub(ch).ListDevices(planner_pb2.ListDevicesRequest()).devices
        assert [DeviceProfile.from_proto(d) for d in listed] == [DeviceProfile.from_json(out.read_text())]
    finally:
        server.stop(0).wait()


def test_link_probe_on_loopback(tmp_path):
    from planner.cluster import Cluster
    from profiler import link

    out = tmp_path / "link.json"
    result = link.profile_link(sizes=(1 << 10, 1 << 14, 1 << 18, 1 << 20), repeats=1)
    assert result.loopback and result.bandwidth_gbps > 0 and result.latency_us >= 0
    link.write(result, out)
    data = json.loads(out.read_text())
    assert data["kind"] == "link" and len(data["samples"]) == 4
    cluster = Cluster.from_toml('[[device]]\ntype = "T4"\n' + data["network_toml"])
    assert cluster.network.intra_host_bandwidth_gbps == pytest.approx(float(f"{result.bandwidth_gbps:.3g}"))


@pytest.mark.parametrize("flags, message", [
    (["--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["--bits", "16,7"], "unknown bitwidth"),
    (["--device", "tpu:0"], "cpu or cuda"),
    (["--device", "nonsense"], "not a torch device"),
    (["--dtype", "int8"], "--dtype 'int8'"),
    (["--contexts", "1,2,x"], "--contexts"),
])
def test_bad_input_is_a_clear_error(model_dir, tmp_path, capsys, flags, message):
    args = ["profile", "--model", str(model_dir), "--out", str(tmp_path / "p.json"), "--no-cache", *FAST]
    assert main(args + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_missing_inputs(tmp_path, capsys):
    assert main(["profile", "--out", str(tmp_path / "p.json")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["profile", "validate", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="no usable CUDA"):
            resolve_device("cuda:0")
    with pytest.raises(NotFound):
        resolve_model(str(tmp_path / "missing" / "config.json"))
    with pytest.raises(InvalidArgument):
        resolve_model("  ")
