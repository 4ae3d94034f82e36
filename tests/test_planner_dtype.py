"""The planner's bytes in the stage dtype, against what `pqmesh.quant` and a stage server compute, and
per-device reserves: float32 CPU stages with a few hundred MiB of --memory-budget must plan."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig

from cli.main import main
from planner import latency as lat
from planner.catalog import model_from_config_json
from planner.cluster import Cluster, ClusterEntry, Device, Network, Workload
from planner.devices import DeviceProfile, Roofline, builtin_profile
from planner.indicator import Quality, default_indicator
from planner.memory import (
    DEFAULT_RESERVE_BYTES,
    element_bytes,
    embedding_bytes,
    head_bytes,
    kv_cache_bytes_per_layer,
    layer_weight_bytes,
    stage_memory,
)
from planner.problem import Problem, evaluate
from planner.request import PlanInputs
from planner.search import plan
from planner.tables import budgets
from pqmesh.errors import InvalidArgument, ResourceExhausted
from pqmesh.plan import PipelinePlan, StagePlan
from pqmesh.quant.memory import predict_layer_bytes
from pqmesh.types import ALL_BITS, Bits, Phase, Role
from stage_server.runtime import ShardSpec, StageRuntime

MIB = 1 << 20
SMOLLM2 = LlamaConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    num_hidden_layers=30,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
OPT_125M = OPTConfig(hidden_size=768, ffn_dim=3072, num_attention_heads=12, num_hidden_layers=12, vocab_size=50272,
                     word_embed_proj_dim=768, max_position_embeddings=2048)
# post-LayerNorm OPT with a projected embedding (opt-350m's layout), fewer layers
OPT_PROJ = OPTConfig(hidden_size=1024, ffn_dim=4096, num_attention_heads=16, num_hidden_layers=6, vocab_size=50272,
                     word_embed_proj_dim=512, do_layer_norm_before=False, max_position_embeddings=2048)
# Gemma-3-270M's dimensions: q/k norms, four norms per layer, GeGLU, 1 KV head of 256, sliding and full layers
GEMMA3_270M = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
                               head_dim=256, num_hidden_layers=18, vocab_size=262144, sliding_window=512,
                               max_position_embeddings=32768, tie_word_embeddings=True)
CONFIGS, CONFIG_IDS = [SMOLLM2, OPT_125M, OPT_PROJ, GEMMA3_270M], ["smollm2", "opt-125m", "opt-proj", "gemma3-270m"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shape_of(config):
    return model_from_config_json(json.dumps({**config.to_dict(), "_name_or_path": config.model_type}))


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("bits", [16, 8, 6, 5, 4, 3, 2])
def test_layer_bytes_match_quant(config, dtype, bits):
    planner = layer_weight_bytes(shape_of(config), Bits(bits), element=element_bytes(dtype))
    quant = predict_layer_bytes(config, bits, 128, dtype)
    assert planner == pytest.approx(quant, rel=0.01)
    assert planner == quant  # the same layout, counted the same way


def _stage_bytes(config, start: int, end: int, bits: list[int], dtype: str, sequences: int, tokens: int) -> int:
    total = config.num_hidden_layers
    role = Role.of(start, end, total)
    spec = ShardSpec("p", "m", start, end, tuple(bits), role, sequences, tokens, next_hop="x:1", dtype=dtype)
    weights, kv = StageRuntime("cpu", 1 << 40, "/nonexistent").predict_bytes(spec, config, DTYPES[dtype])
    return weights + kv


SHARDS = [(0, 3, [16, 4, 3]), (3, 5, [8, 2]), (5, 6, [16]), (4, 6, [4, 16]), (0, 6, [16, 8, 4, 3, 2, 4])]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shard", SHARDS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_stage_total_never_below_what_the_stage_requires(config, dtype, shard):
    start, end, bits = shard
    fields = {**config.to_dict(), "num_hidden_layers": 6}
    fields.pop("layer_types", None)  # Gemma 3: rebuilt for 6 layers
    config = type(config)(**fields)
    shape, workload = shape_of(config), Workload(4, 24, 8)
    mem = stage_memory(shape, workload, [Bits(b) for b in bits], start == 0, end == 6, 2, 4, reserve=0,
                       element=element_bytes(dtype))
    stage = _stage_bytes(config, start, end, bits, dtype, workload.batch_size, workload.max_context)
    ours = mem.weights + mem.embeddings_and_head + mem.kv_cache + mem.workspace
    assert ours >= stage
    assert ours == pytest.approx(stage, rel=0.01)  # and not by much: the same parts
    assert mem.total >= stage


def test_float32_doubles_unquantized_bytes_only():
    shape, e = shape_of(SMOLLM2), element_bytes("float32")
    assert e == 4 and element_bytes("") == element_bytes("float16") == element_bytes("bfloat16") == 2
    assert layer_weight_bytes(shape, Bits.B16, element=e) == 2 * layer_weight_bytes(shape, Bits.B16)
    norms = shape.layer_fp16_params()
    # 4-bit: packed codes and fp16 scales are the same; only norms (and biases) grow
    assert layer_weight_bytes(shape, Bits.B4, element=e) - layer_weight_bytes(shape, Bits.B4) == norms * 2
    assert kv_cache_bytes_per_layer(shape, 2, 10, e) == 2 * kv_cache_bytes_per_layer(shape, 2, 10)
    assert embedding_bytes(shape, e) == 2 * embedding_bytes(shape)
    assert head_bytes(shape, False, e) == 2 * head_bytes(shape)
    with pytest.raises(InvalidArgument, match="float32"):
        element_bytes("float64")


def test_float32_roofline_and_links_move_four_bytes():
    shape, profile = shape_of(SMOLLM2), DeviceProfile("r", "r", 1 << 30, Roofline(1e6, 1.0, 1.0, 1.0, 1.0, 0.0))
    t16 = lat.layer_seconds(profile, shape, Bits.B16, Phase.DECODE, 1, 8, 10)
    t32 = lat.layer_seconds(profile, shape, Bits.B16, Phase.DECODE, 1, 8, 10, element=4)
    assert t32 == pytest.approx(2 * t16, rel=1e-6)  # memory-bound: every byte moved doubles
    assert lat.head_seconds(profile, shape, 1, 4) > lat.head_seconds(profile, shape, 1)
    assert lat.activation_bytes(shape, 2, 3, 4) == 2 * lat.activation_bytes(shape, 2, 3)


def cpu_profile(name: str, budget: int, reserve: int | None = 0) -> DeviceProfile:
    return DeviceProfile(
        name=name, device_type="cpu", memory_bytes=budget, roofline=Roofline(0.5, 20.0), reserve_bytes=reserve
    )


def cpu_problem(budget: int, reserve: int | None = 0, dtype: str = "float32", stages: int = 2) -> Problem:
    devices = tuple(Device(f"cpu{i}", cpu_profile(f"cpu{i}", budget, reserve), "localhost") for i in range(stages))
    shape = shape_of(SMOLLM2)
    return Problem(shape, devices, Network(bandwidth_gbps=10, latency_us=50), Workload(4, 32, 16),
                   default_indicator(shape.num_layers), Quality(theta=0.0), ALL_BITS, dtype=dtype)


def test_reserve_bytes_round_trip_and_validation():
    unset, zero = cpu_profile("a", 300 * MIB, None), cpu_profile("a", 300 * MIB, 0)
    assert unset != zero
    for profile in (unset, zero, cpu_profile("a", 300 * MIB, 8 * MIB)):
        assert DeviceProfile.from_json(profile.to_json()) == profile
        assert DeviceProfile.from_proto(profile.to_proto()) == profile
    assert '"reserve_bytes": "0"' in zero.to_json() and "reserve_bytes" not in unset.to_json()
    assert (
        DeviceProfile.from_json(zero.to_json().replace('"reserve_bytes": "0"', '"reserve_bytes": 4096')).reserve_bytes
        == 4096
    )
    assert builtin_profile("t4").reserve_bytes is None
    with pytest.raises(InvalidArgument, match="reserve_bytes"):
        cpu_profile("a", 300 * MIB, 300 * MIB)


def test_reserve_is_per_device():
    problem = cpu_problem(400 * MIB)
    gpu = Device("t4", builtin_profile("t4"), "gpu-host")
    assert problem.reserve(problem.devices[0]) == 0
    assert problem.reserve(gpu) == DEFAULT_RESERVE_BYTES
    small = cpu_problem(400 * MIB, reserve=8 * MIB)
    assert small.reserve(small.devices[0]) == 8 * MIB
    wide, narrow = (budgets(p, list(p.devices), (1,), Phase.DECODE) for p in (problem, small))
    assert [w[0] - n[0] for w, n in zip(wide, narrow)] == [8 * MIB] * 2
    layers = [StagePlan("cpu0", 0, 15, (Bits.B16,) * 15), StagePlan("cpu1", 15, 30, (Bits.B16,) * 15)]
    ev = evaluate(small, PipelinePlan(tuple(layers), 1, 1))
    assert [m.reserve for m in ev.memory] == [8 * MIB, 8 * MIB]


def test_cpu_mesh_plans_in_float32_within_the_stage_budgets():
    """Two CPU stages with 300 MiB budgets: float32 SmolLM2 (~540 MB unquantized) must be quantized,
    and every stage's predicted total must cover what the stage will check against --memory-budget."""
    budget = 300 * MIB
    problem = cpu_problem(budget)
    result = plan(problem, 10.0)
    ev = evaluate(problem, result.plan)
    assert ev.feasible and all(m <= budget for m in result.predicted.memory_bytes)
    assert any(b != Bits.B16 for b in result.plan.bits_per_layer)  # 16-bit float32 does not fit 2 x 300 MiB
    for stage, mem in zip(result.plan.stages, ev.memory):
        need = _stage_bytes(SMOLLM2, stage.start, stage.end, [int(b) for b in stage.bits], "float32", 4, 48)
        assert need <= mem.total <= budget
    # the same mesh with the 1 GiB GPU default reserve: nothing fits
    with pytest.raises(ResourceExhausted, match="does not fit"):
        plan(cpu_problem(budget, reserve=None), 5.0)


def test_float32_needs_more_memory_than_float16():
    stages = (StagePlan("cpu0", 0, 15, (Bits.B16,) * 15), StagePlan("cpu1", 15, 30, (Bits.B4,) * 15))
    p = PipelinePlan(stages, 1, 1)
    m16, m32 = evaluate(cpu_problem(4096 * MIB, dtype="float16"), p), evaluate(cpu_problem(4096 * MIB), p)
    assert m32.memory[0].weights == 2 * m16.memory[0].weights
    assert m32.memory[1].kv_cache == 2 * m16.memory[1].kv_cache
    assert all(a.total > b.total for a, b in zip(m32.memory, m16.memory))


def test_plan_request_dtype_round_trip():
    inputs = PlanInputs("opt-13b", Cluster((ClusterEntry("t4", 1),)), Workload(4, 32, 16), dtype="float32")
    assert inputs.to_proto().dtype == "float32"
    assert PlanInputs.from_json(inputs.to_json()) == inputs
    assert inputs.to_problem().dtype == "float32"
    default = PlanInputs("opt-13b", Cluster((ClusterEntry("t4", 1),)), Workload(4, 32, 16), dtype="")
    # unset stays unset until the devices are known: then the profiles' dtype, else float16
    assert default.dtype == "" and default.to_proto().dtype == ""
    assert PlanInputs.from_proto(default.to_proto()).to_problem().dtype == "float16"
    with pytest.raises(InvalidArgument, match="float16, bfloat16, float32"):
        PlanInputs("opt-13b", Cluster((ClusterEntry("t4", 1),)), Workload(4, 32, 16), dtype="int8")


def test_cli_dtype_float32_with_cpu_profiles(tmp_path, capsys):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        '[[device]]\ntype = "cpu"\nname = "cpu0"\nhost = "a"\n[[device]]\ntype = "cpu"\nname = "cpu1"\nhost = "a"\n'
        "[network]\nbandwidth_gbps = 10\nlatency_us = 50\n"
    )
    profiles = []
    for name in ("cpu0", "cpu1"):
        path = tmp_path / f"{name}.json"
        path.write_text(cpu_profile(name, 300 * MIB).to_json())
        profiles += ["--profile", str(path)]
    model = tmp_path / "smollm2" / "config.json"
    model.parent.mkdir()
    model.write_text(SMOLLM2.to_json_string())
    args = ["plan", "--cluster", str(cluster), "--model", str(model.parent), "--batch", "4", "--prompt-len", "32",
            "--gen-len", "16", "--time-limit", "5", "--json", *profiles]
    assert main([*args, "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(m <= 300 * MIB for m in report["predicted"]["memory_bytes"])
    assert main(args) == 0  # default float16
    assert all(m <= 300 * MIB for m in json.loads(capsys.readouterr().out)["predicted"]["memory_bytes"])
    with pytest.raises(SystemExit):  # argparse names the choices
        main([*args, "--dtype", "float64"])
    assert "float16,bfloat16,float32" in capsys.readouterr().err
