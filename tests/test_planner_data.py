"""Planner inputs and outputs as data: parsing, validation with useful messages, proto and JSON round trips."""

from __future__ import annotations

import json

import pytest

from planner.catalog import BUILTIN_CONFIGS, builtin_model, canonical_name, resolve_model
from planner.cluster import Cluster, ClusterEntry, Network, Workload, expand
from planner.devices import BUILTIN_GPUS, DeviceProfile, LatencyModel, Roofline, builtin_profile, normalize_type
from planner.indicator import SHIPPED_DIR, Indicator, Quality, default_indicator
from planner.model_shapes import ModelShape, from_hf_config
from planner.plans import Baseline, PlanResult, Prediction
from planner.request import PlanInputs
from pqmesh.errors import InvalidArgument, NotFound, UnsupportedModel
from pqmesh.plan import PipelinePlan, StagePlan
from pqmesh.types import ALL_BITS, Bits, Phase, allowed_bits

PUBLISHED_PARAMS = {  # billions, as published with the checkpoints
    "opt-13b": 12.85, "opt-30b": 29.97, "opt-66b": 65.7, "opt-175b": 174.6, "bloom-3b": 3.0, "bloom-176b": 176.2,
    "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98, "llama-3-8b": 8.03, "llama-3-70b": 70.55,
    "smollm2-135m-instruct": 0.1345, "gemma-3-270m": 0.268,
}


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_models_have_their_published_size(name):
    shape = builtin_model(name)
    assert shape.total_params() / 1e9 == pytest.approx(PUBLISHED_PARAMS[name], rel=0.02)
    assert ModelShape.from_json(shape.to_json()) == shape


def test_model_names_and_configs_resolve(tmp_path):
    assert canonical_name("facebook/OPT-30B") == "opt-30b"
    assert canonical_name("meta-llama/Llama-2-70b-hf") == "llama-2-70b"
    assert resolve_model("meta-llama/Meta-Llama-3-8B").num_kv_heads == 8
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(BUILTIN_CONFIGS["llama-2-70b"]))
    shape = resolve_model(str(tmp_path / "m"))
    assert (shape.name, shape.kv_dim, shape.num_layers) == ("m", 8 * 128, 80)
    with pytest.raises(NotFound, match="opt-13b"):
        resolve_model("gpt-5")
    with pytest.raises(UnsupportedModel, match="gpt2"):
        from_hf_config({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 10})
    with pytest.raises(InvalidArgument, match="ffn_dim"):
        from_hf_config(
            {"model_type": "opt", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}
        )


def test_bits_and_phases_parse():
    assert Bits.parse("int8") is Bits.B8 and Bits.parse("BITS_16") is Bits.B16 and Bits.parse(3) is Bits.B3
    assert allowed_bits(["4", "16", "4"]) == (Bits.B16, Bits.B4)
    assert allowed_bits([]) == ALL_BITS and Bits.B5 not in ALL_BITS  # 6 and 5 bits are opt-in
    assert allowed_bits([3, "5", 8, "int6"]) == (Bits.B8, Bits.B6, Bits.B5, Bits.B3)
    with pytest.raises(InvalidArgument, match="16"):
        Bits.parse(7)
    with pytest.raises(InvalidArgument, match="BITS_UNSPECIFIED"):
        Bits.from_proto(0)
    assert Phase.parse("PHASE_DECODE") is Phase.DECODE


def _fitted_profile() -> DeviceProfile:
    return DeviceProfile("t4-node1", "T4", 15 << 30, Roofline(65, 320), model="opt-30b", latency=(
        LatencyModel(Bits.B4, Phase.DECODE, ("const", "tokens*context"), (2e-4, 3e-10)),
        LatencyModel(Bits.B16, Phase.PREFILL, ("const", "tokens"), (1e-3, 2e-6), calibrated=False)))


def test_device_profile_round_trips_and_is_used_only_for_its_model():
    profile = _fitted_profile()
    assert DeviceProfile.from_proto(profile.to_proto()) == profile
    assert DeviceProfile.from_json(profile.to_json()) == profile
    assert profile.fitted("opt-30b", Bits.B4, Phase.DECODE).seconds(2, 2, 100) == pytest.approx(2e-4 + 3e-10 * 200)
    assert profile.fitted("opt-66b", Bits.B4, Phase.DECODE) is None
    assert profile.fitted("opt-30b", Bits.B8, Phase.DECODE) is None  # the roofline covers it


def test_device_profile_validation_says_what_to_fix():
    with pytest.raises(InvalidArgument, match="roofline"):
        DeviceProfile.from_json('{"name": "x", "device_type": "x", "memory_bytes": 1, "version": 1}')
    with pytest.raises(InvalidArgument, match="set `model`"):
        DeviceProfile("x", "x", 1, Roofline(1, 1), latency=_fitted_profile().latency)
    with pytest.raises(InvalidArgument, match="unknown"):
        LatencyModel(Bits.B4, Phase.DECODE, ("weird",), (1.0,))
    with pytest.raises(InvalidArgument, match="version"):
        DeviceProfile("x", "x", 1, Roofline(1, 1), version=2)
    with pytest.raises(InvalidArgument, match="pqmesh.planner.v1.DeviceProfile"):
        DeviceProfile.from_json('{"name": "x", "colour": 1}')


@pytest.mark.parametrize("name", sorted(BUILTIN_GPUS))
def test_builtin_gpus_are_uncalibrated_rooflines(name):
    profile = builtin_profile(name)
    assert profile.memory_bytes > 10 << 30 and not profile.calibrated and not profile.latency


def test_device_type_spellings():
    assert normalize_type("NVIDIA V100_32GB") == "v100-32g"
    assert normalize_type("RTX 3090") == "rtx-3090"
    assert normalize_type("Tesla T4") == "t4"
    with pytest.raises(NotFound, match="a100-40g"):
        builtin_profile("tpu-v4")


def test_cluster_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[device]]\ntype = "T4"\ncount = 2\n[[device]]\ntype = "A100-40G"\nname = "big"\nhost = "n2"\n'
                    "[network]\nbandwidth_gbps = 25\n")
    cluster = Cluster.load(path)
    assert cluster.network == Network(bandwidth_gbps=25.0)
    devices = expand(cluster)
    assert [d.label for d in devices] == ["t4:0", "t4:1", "big"]
    assert devices[0].host == devices[1].host != devices[2].host == "n2"
    assert Cluster.from_proto_fields(**{"devices": cluster.to_proto_fields()["devices"],
                                        "network": cluster.to_proto_fields()["network"]}) == cluster
    with pytest.raises(InvalidArgument, match="unknown keys"):
        Cluster.from_toml('[[device]]\ntype = "T4"\ngpus = 2\n')
    with pytest.raises(InvalidArgument, match="count"):
        Cluster.from_toml('[[device]]\ntype = "T4"\ncount = 0\n')
    with pytest.raises(InvalidArgument, match=r"\[\[device\]\]"):
        Cluster.from_toml("[network]\nbandwidth_gbps = 1\n")
    with pytest.raises(NotFound, match="register"):
        expand(Cluster((ClusterEntry("tpu-v4"),)))


def test_registered_profile_wins_over_builtin():
    custom = DeviceProfile("fast-t4", "T4", 8 << 30, Roofline(100, 500))
    devices = expand(Cluster((ClusterEntry("T4", 1, name="fast-t4"), ClusterEntry("T4"))), {"fast-t4": custom}.get)
    assert devices[0].profile == custom and devices[1].profile == builtin_profile("T4")


def test_indicator_file_and_default(tmp_path):
    text = json.dumps(
        {
            "version": 1,
            "model": "m",
            "kind": "variance",
            "group_size": 128,
            "samples": 8,
            "layers": [
                {"layer": 1, "bits": {"8": 0.1, "4": 0.3}},
                {"layer": 0, "bits": {"16": 0.0, "8": 0.2, "4": 0.5}},
            ],
        }
    )
    ind = Indicator.from_json(text)
    assert ind.value(0, Bits.B4) == 0.5 and ind.value(1, Bits.B16) == 0.0 and not ind.is_uniform()
    assert Indicator.from_json(ind.to_json()) == ind
    with pytest.raises(InvalidArgument, match="2-bit"):
        ind.check(2, (Bits.B8, Bits.B2), "m")
    with pytest.raises(InvalidArgument, match="numbered"):
        Indicator.from_json(json.dumps({"version": 1, "layers": [{"layer": 1, "bits": {"8": 0.1}}]}))
    with pytest.raises(InvalidArgument, match="2 layers"):
        ind.check(3, (Bits.B8,), "m")
    default = default_indicator(10)
    assert sum(default.value(i, Bits.B4) for i in range(10)) == pytest.approx(1.0)
    assert default.value(0, Bits.B3) == pytest.approx(4 * default.value(0, Bits.B4))
    assert Quality().resolved(default).bound == pytest.approx(1.0)
    with pytest.raises(InvalidArgument, match="not both"):
        Quality(theta=1, bound=1)


def _result() -> PlanResult:
    plan = PipelinePlan((StagePlan("t4:0", 0, 2, (Bits.B8, Bits.B4)), StagePlan("big", 2, 3, (Bits.B16,))), 4, 8)
    pred = Prediction(12.5, 1.0, 2.0, (100, 200), 0.25)
    baselines = {"pipeedge": Baseline(True, pred, plan), "uniform_int8": Baseline(False, reason="t4:0 short by 1 GiB")}
    return PlanResult(plan, pred, baselines, 0.5, 0.01)


def test_plans_round_trip_and_validate():
    result = _result()
    assert PlanResult.from_proto(result.to_proto()) == result
    assert PlanResult.from_json(result.to_json()) == result
    assert PipelinePlan.from_json(result.plan.to_json()) == result.plan
    assert len(result.plan.plan_id) == 16
    with pytest.raises(InvalidArgument, match="contiguous"):
        PipelinePlan((StagePlan("a", 0, 2, (Bits.B8,) * 2), StagePlan("b", 3, 4, (Bits.B8,))), 1, 1)
    with pytest.raises(InvalidArgument, match="bitwidths"):
        StagePlan("a", 0, 2, (Bits.B8,))
    report = result.to_report()
    assert report["plan"]["stages"][0] == {"device": "t4:0", "layers": [0, 2], "bits": [8, 4]}
    assert report["baselines"]["uniform_int8"] == {
        "feasible": False,
        "throughput_tokens_per_s": 0.0,
        "reason": "t4:0 short by 1 GiB",
    }


def test_default_plan_of_the_embedded_model_reads_its_shipped_indicator():
    from transformers import LlamaConfig

    shipped = Indicator.load(SHIPPED_DIR / "smollm2-135m-instruct.json")
    # the embedded checkpoint's config.json as the demo sends it (inline, under another name)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192).to_dict()
    cluster = Cluster((ClusterEntry("T4", 2),))
    for model in (json.dumps({**config, "_name_or_path": "/cache/models/x"}), "smollm2-135m-instruct"):
        problem = PlanInputs(model, cluster, Workload(4, 32, 16)).to_problem()
        assert problem.indicator == shipped and not shipped.is_uniform() and shipped.num_layers == 30
        assert problem.quality.bound == pytest.approx(sum(shipped.value(i, Bits.B4) for i in range(30)))
    assert PlanInputs("llama-2-7b", cluster, Workload(4, 32, 16)).to_problem().indicator == default_indicator(32)
    given = default_indicator(30).to_json()
    assert PlanInputs(json.dumps(config), cluster, Workload(4, 32, 16), indicator_json=given).to_problem().indicator \
        == Indicator.from_json(given)


def test_plan_request_round_trips():
    cluster = Cluster((ClusterEntry("T4", 3, host="a"), ClusterEntry("V100-32G")), Network(bandwidth_gbps=25))
    for quality in (Quality(), Quality(theta=0.5), Quality(bound=2.0)):
        inputs = PlanInputs(
            "opt-30b", cluster, Workload(32, 512, 100), quality, allowed_bits=(Bits.B8, Bits.B4), time_limit_s=3
        )
        assert PlanInputs.from_proto(inputs.to_proto()) == inputs
        assert PlanInputs.from_json(inputs.to_json()) == inputs
    inline = PlanInputs(json.dumps(BUILTIN_CONFIGS["bloom-3b"]), cluster, Workload(1, 2, 3))
    assert PlanInputs.from_json(inline.to_json()) == inline
    assert inline.to_problem().shape.family == "bloom"
    with pytest.raises(InvalidArgument, match="workload"):
        PlanInputs.from_json('{"model_name": "opt-13b"}')
    with pytest.raises(InvalidArgument, match="batch_size"):
        Workload(0, 1, 1)


def test_default_plan_of_gemma_reads_its_shipped_indicator():
    from transformers import Gemma3TextConfig

    shipped = Indicator.load(SHIPPED_DIR / "gemma-3-270m.json")
    config = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=256, num_hidden_layers=18, vocab_size=262144, sliding_window=512,
                              max_position_embeddings=32768, tie_word_embeddings=True).to_dict()
    cluster = Cluster((ClusterEntry("T4", 2),))
    for model in (json.dumps({**config, "_name_or_path": "/cache/models/g"}), "gemma-3-270m"):
        problem = PlanInputs(model, cluster, Workload(4, 32, 16)).to_problem()
        assert problem.indicator == shipped and not shipped.is_uniform() and shipped.num_layers == 18
        assert shipped.kind == "kl" and all(shipped.value(i, b) >= 0 for i in range(18) for b in ALL_BITS)
