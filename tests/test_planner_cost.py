"""The planner's cost model against hand-computed cases: bytes, latency, pipeline formulas, whole plans."""

from __future__ import annotations

import pytest

from planner import latency as lat
from planner.cluster import Device, Network, Workload
from planner.devices import DeviceProfile, LatencyModel, Roofline
from planner.indicator import Quality, default_indicator
from planner.memory import (
    embedding_bytes,
    head_bytes,
    kv_cache_bytes_per_layer,
    layer_weight_bytes,
    linear_weight_bytes,
    stage_memory,
    temp_activation_bytes,
)
from planner.model_shapes import ModelShape
from planner.problem import CostConfig, Problem, evaluate
from pqmesh.plan import PipelinePlan, StagePlan
from pqmesh.types import Bits, Phase

# hidden 256, ffn 1024, 4 heads: q,k,v,o are 256x256, fc1 256x1024, fc2 1024x256
TINY = ModelShape(name="tiny", family="opt", num_layers=4, hidden_size=256, intermediate_size=1024, num_heads=4,
                  num_kv_heads=4, head_dim=64, vocab_size=1000, max_positions=64, learned_positions=True)
FAST = Roofline(1e6, 1e9, 1.0, 1.0, 1.0, 0.0)  # head and embeddings cost ~1e-12 s


def tiny_profile(name: str, scale: float = 1.0, memory: int = 1 << 30) -> DeviceProfile:
    """Fitted per-layer latencies with round numbers (seconds per layer and micro-batch)."""
    return DeviceProfile(name=name, device_type=name, memory_bytes=memory, roofline=FAST, model="tiny", latency=(
        LatencyModel(Bits.B16, Phase.PREFILL, ("const",), (0.010 * scale,)),
        LatencyModel(Bits.B16, Phase.DECODE, ("const", "tokens*context"), (0.001 * scale, 1e-6 * scale)),
        LatencyModel(Bits.B4, Phase.PREFILL, ("const",), (0.004 * scale,)),
        LatencyModel(Bits.B4, Phase.DECODE, ("const",), (0.0005 * scale,)),
    ))


def test_linear_weight_bytes_by_hand():
    assert linear_weight_bytes(256, 256, Bits.B16) == 65536 * 2
    # 65536 weights at 4 bits = 32768 bytes; 2 groups of 128 per row x 256 rows x 4 bytes = 2048
    assert linear_weight_bytes(256, 256, Bits.B4) == 32768 + 2048
    assert linear_weight_bytes(128, 10, Bits.B3) == 480 + 40
    # as the stage stores it: 3-bit rows padded to 8 codes (136 x 3 / 8 = 51 bytes), and 130 inputs
    # split into 2 groups of 65 (the largest divisor of 130 up to 128), each with a scale and offset
    assert linear_weight_bytes(130, 10, Bits.B3) == 510 + 80
    assert linear_weight_bytes(256, 256, Bits.B8) == 65536 + 2048


def test_layer_weight_bytes_by_hand():
    fp16_params = 2 * 2 * 256 + (256 + 2 * 256 + 256) + (1024 + 256)  # 2 LayerNorms, attention and MLP biases
    assert TINY.layer_fp16_params() == fp16_params
    assert layer_weight_bytes(TINY, Bits.B16) == (786432 + fp16_params) * 2
    # every matrix at 4 bits: 34816 x 4 (attention) + 139264 x 2 (MLP) + the 16-bit rest
    assert layer_weight_bytes(TINY, Bits.B4) == 34816 * 4 + 139264 * 2 + fp16_params * 2


def test_kv_cache_uses_kv_heads_under_gqa():
    gqa = ModelShape(name="g", family="llama", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=8,
                     num_kv_heads=2, head_dim=32, vocab_size=100, gated_mlp=True, rms_norm=True)
    assert gqa.kv_dim == 64
    assert kv_cache_bytes_per_layer(gqa, sequences=3, tokens=10) == 2 * 3 * 10 * 64 * 2


def test_temp_activation_by_hand():
    # 2 x 5 tokens; widest intermediate is fc1 (1024); scores 10 tokens x 4 heads x 5 keys
    assert temp_activation_bytes(TINY, 2, 5, 5) == (10 * (2 * 256 + 1024) + 10 * 4 * 5) * 2


def test_embeddings_and_head_bytes():
    assert embedding_bytes(TINY) == (1000 * 256 + 66 * 256) * 2  # OPT positions have 2 extra rows
    assert head_bytes(TINY) == (1000 * 256 + 2 * 256) * 2
    assert head_bytes(TINY, single_stage=True) == 2 * 256 * 2  # tied head shares the embedding


def test_stage_memory_adds_up():
    w = Workload(4, 8, 3)
    first = stage_memory(TINY, w, [Bits.B16, Bits.B4], True, False, 2, 4, reserve=100)
    assert first.weights == layer_weight_bytes(TINY, Bits.B16) + layer_weight_bytes(TINY, Bits.B4)
    assert first.kv_cache == 2 * kv_cache_bytes_per_layer(TINY, 4, 11)
    assert first.activations == max(temp_activation_bytes(TINY, 2, 8, 8), temp_activation_bytes(TINY, 4, 1, 11))
    assert first.embeddings_and_head == embedding_bytes(TINY)
    # one shared dequantization buffer for the 4-bit layer: the largest matrix (fc1) in fp16 + its codes
    assert first.workspace == 256 * 1024 * 2 + 256 * 1024
    assert (
        first.total
        == first.weights + first.kv_cache + first.activations + embedding_bytes(TINY) + 100 + first.workspace
    )
    last = stage_memory(TINY, w, [Bits.B4], False, True, 2, 4, reserve=0)
    assert last.embeddings_and_head == head_bytes(TINY)
    # fp32 logits of each micro-batch's last positions: 2 x 1000 x 4 in prefill, 4 x 1000 x 4 in decode
    assert last.activations == max(
        temp_activation_bytes(TINY, 2, 8, 8) + 8000, temp_activation_bytes(TINY, 4, 1, 11) + 16000
    )


def test_roofline_decode_is_memory_bound_and_scales_with_bits():
    profile = DeviceProfile("r", "r", 1 << 30, Roofline(1.0, 1.0, 1.0, 1.0, 2.0, 0.0))  # 1 TFLOP/s, 1 GB/s
    t16 = lat.layer_seconds(profile, TINY, Bits.B16, Phase.DECODE, 1, 8, 10)
    assert t16 == pytest.approx((layer_weight_bytes(TINY, Bits.B16) + 2 * 10 * 256 * 2 + 2 * 256 * 2) / 1e9)
    t4 = lat.layer_seconds(profile, TINY, Bits.B4, Phase.DECODE, 1, 8, 10)
    assert t4 == pytest.approx((layer_weight_bytes(TINY, Bits.B4) + 10240 + 1024) / 1e9)


def test_roofline_prefill_is_compute_bound_with_dequant_overhead():
    profile = DeviceProfile("r", "r", 1 << 30, Roofline(0.001, 1000.0, 1.0, 1.0, 2.0, 0.0))  # 1 GFLOP/s
    flops = 2 * 786432 * 16 + 4 * 16 * 8 * 256  # 2 sequences x 8 tokens, 8 keys each
    assert lat.layer_seconds(profile, TINY, Bits.B16, Phase.PREFILL, 2, 8, 0) == pytest.approx(flops / 1e9)
    assert lat.layer_seconds(profile, TINY, Bits.B4, Phase.PREFILL, 2, 8, 0) == pytest.approx(2 * flops / 1e9)


def test_pipeline_formulas():
    assert lat.prefill_seconds([1.0, 2.0, 3.0], 4) == 6 + 3 * 3
    assert lat.prefill_seconds([5.0], 3) == 15  # one stage: m x t
    assert lat.decode_round_seconds([1.0, 2.0, 3.0], 4) == 12  # full pipeline: m x max
    assert lat.decode_round_seconds([1.0, 2.0, 3.0], 1) == 6  # one micro-batch: one trip around
    assert lat.decode_round_seconds([5.0], 3) == 15


def test_decode_segments_cover_every_round():
    assert lat.decode_segments(10, 5, 4) == [(1, 11), (1, 12), (1, 13), (1, 14)]
    assert lat.decode_segments(10, 5, 2) == [(2, 11.5), (2, 13.5)]
    assert lat.decode_segments(10, 1, 4) == []
    segments = lat.decode_segments(512, 100, 4)
    assert sum(r for r, _ in segments) == 99
    assert sum(r * c for r, c in segments) == sum(512 + s for s in range(1, 100))  # mean context is exact


def test_network_link_seconds():
    net = Network(bandwidth_gbps=8, latency_us=100, intra_host_bandwidth_gbps=80, intra_host_latency_us=10)
    assert net.link_seconds(1e9, same_host=False) == pytest.approx(1e-4 + 1.0)
    assert net.link_seconds(1e9, same_host=True) == pytest.approx(1e-5 + 0.1)


def _problem(devices, workload=Workload(4, 8, 3)):
    return Problem(TINY, tuple(devices), Network(bandwidth_gbps=8, latency_us=100), workload, default_indicator(4),
                   Quality(theta=0.0), (Bits.B16, Bits.B4), CostConfig(reserve_bytes=0))


def test_two_stage_plan_by_hand():
    a, b = Device("a", tiny_profile("a"), "h1"), Device("b", tiny_profile("b"), "h2")
    plan = PipelinePlan((StagePlan("a", 0, 2, (Bits.B16, Bits.B16)), StagePlan("b", 2, 4, (Bits.B4, Bits.B4))), 2, 4)
    ev = evaluate(_problem([a, b]), plan)
    link = 1e-4 + (2 * 8 * 256 * 2) * 8 / 8e9  # 2 sequences x 8 tokens of hidden states
    prefill = (0.020 + 0.008 + link) + (2 - 1) * 0.020
    forward, back = 1e-4 + 2048 * 8 / 8e9, 1e-4 + 16 * 8 / 8e9  # decode: 4 hidden vectors; 4 token ids
    round9 = 2 * (0.001 + 36e-6) + 0.001 + forward + back  # one micro-batch: sum of everything
    round10 = 2 * (0.001 + 40e-6) + 0.001 + forward + back
    assert ev.prediction.prefill_s == pytest.approx(prefill, rel=1e-9)
    assert ev.prediction.decode_s == pytest.approx(round9 + round10, rel=1e-9)
    assert ev.prediction.throughput_tokens_per_s == pytest.approx(4 * 3 / (prefill + round9 + round10), rel=1e-9)
    assert ev.prediction.quality == pytest.approx(2 * default_indicator(4).value(0, Bits.B4))
    assert ev.objective == pytest.approx(prefill + round9 + round10, rel=1e-9)


def test_one_stage_plan_is_m_times_t():
    a = Device("a", tiny_profile("a"), "h1")
    plan = PipelinePlan((StagePlan("a", 0, 4, (Bits.B4,) * 4),), 1, 2)
    ev = evaluate(_problem([a]), plan)
    assert ev.prediction.prefill_s == pytest.approx(4 * 4 * 0.004, rel=1e-9)  # 4 micro-batches of 1
    assert ev.prediction.decode_s == pytest.approx(2 * 2 * 4 * 0.0005, rel=1e-9)  # 2 rounds x 2 micro-batches
    assert ev.memory[0].embeddings_and_head == embedding_bytes(TINY) + head_bytes(TINY, single_stage=True)


def test_memory_shortfall_is_reported_per_device():
    small = Device("a", tiny_profile("a", memory=2_000_000), "h1")
    plan = PipelinePlan((StagePlan("a", 0, 4, (Bits.B16,) * 4),), 1, 1)
    ev = evaluate(_problem([small]), plan)
    assert not ev.fits and ev.shortfalls()[0] == ev.memory[0].total - 2_000_000
