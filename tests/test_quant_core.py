"""Bitwidth enum, bit packing and group-wise quantization of single weights and tiny-model layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_checkpoint

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.errors import InvalidArgument
from pqmesh.model import ModelShard
from pqmesh.quant.bit_plan import parse_bits_spec
from pqmesh.quant.layer import linear_children, quantize_layer
from pqmesh.quant.packing import pack, row_bytes, unpack
from pqmesh.quant.qlinear import QuantLinear, effective_group_size, quantize_weight
from pqmesh.types import Bits

QUANTIZED = [8, 6, 5, 4, 3, 2]


# -- Bits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("4", Bits.B4),
        (" int8 ", Bits.B8),
        ("3bit", Bits.B3),
        ("int5", Bits.B5),
        (6, Bits.B6),
        ("BITS_2", Bits.B2),
        ("fp16", Bits.B16),
        (16, Bits.B16),
        (Bits.B3, Bits.B3),
    ],
)
def test_bits_parse(text, expected):
    assert Bits.parse(text) is expected


@pytest.mark.parametrize("bad", ["7", "four", "", 1, 32, True, 4.0])
def test_bits_parse_rejects_with_choices(bad):
    with pytest.raises(InvalidArgument, match="16, 8, 6, 5, 4, 3, 2"):
        Bits.parse(bad)


def test_bits_proto_numbers_match():
    for bits in Bits:
        assert bits.to_proto() == bits.count == tensor_pb2.Bits.Value(f"BITS_{bits.count}")
        assert Bits.from_proto(bits.to_proto()) is bits
    with pytest.raises(InvalidArgument, match="unspecified"):
        Bits.from_proto(tensor_pb2.BITS_UNSPECIFIED)


def test_bits_spec_forms(tmp_path):
    assert parse_bits_spec("4", 3) == [Bits.B4] * 3
    assert parse_bits_spec("16,8,3", 3) == [Bits.B16, Bits.B8, Bits.B3]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"bits": [2, "4", 16]}))
    assert parse_bits_spec(str(plan), 3) == [Bits.B2, Bits.B4, Bits.B16]
    with pytest.raises(InvalidArgument, match="3 entries but the model has 4 layers"):
        parse_bits_spec("16,8,3", 4)


# -- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", QUANTIZED)
@pytest.mark.parametrize("width", [1, 7, 8, 61, 64, 576])
def test_pack_unpack_exact(bits, width):
    gen = torch.Generator().manual_seed(width * 10 + bits)
    codes = torch.randint(0, 1 << bits, (5, width), dtype=torch.uint8, generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, row_bytes(width, bits))
    assert packed.shape[1] * 8 <= bits * (width + 7)  # at most 7 codes of padding per row
    assert torch.equal(unpack(packed, bits, width)[:, :width], codes)


def test_three_bits_cost_three_bits():
    assert row_bytes(576, 3) == 576 * 3 // 8 and row_bytes(1536, 4) == 768 and row_bytes(64, 2) == 16
    assert row_bytes(576, 5) == 576 * 5 // 8 and row_bytes(576, 6) == 576 * 6 // 8


# -- quantize_weight -------------------------------------------------------------------------------
def test_effective_group_size():
    assert effective_group_size(4096, 128) == 128
    assert effective_group_size(576, 128) == 96
    assert effective_group_size(64, 128) == 64
    with pytest.raises(InvalidArgument):
        effective_group_size(64, 0)


def test_eight_bit_error_within_half_step():
    w = torch.randn(32, 576)
    q = quantize_weight(w, 8, 128)
    assert q.group_size == 96 and q.scale.shape == (32, 6) and q.scale.dtype == torch.float16
    err = (q.dequantize() - w).abs().view(32, 6, 96)
    assert (err <= q.scale.float().unsqueeze(-1) * 0.5 + 1e-3 * w.abs().max()).all()


def test_constant_group_is_exact():
    w = torch.full((4, 128), 0.25)
    for bits in QUANTIZED:
        q = quantize_weight(w, bits)
        assert torch.equal(q.dequantize(), w) and (q.scale == 0).all()


@pytest.mark.parametrize("bits", QUANTIZED)
def test_quant_linear_matches_its_dequantized_weight(bits):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(320, 96)
    q = QuantLinear.from_linear(linear, bits)
    x = torch.randn(3, 5, 320)
    expected = F.linear(x, quantize_weight(linear.weight, bits).dequantize(), linear.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the shard runs under inference mode; buffers must work in both
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


# -- whole tiny-model layers ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "opt", "bloom"])
def tiny_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_checkpoint(request.param, directory, layers=2)
    return directory


ROUND_TRIP_BOUND = {8: 0.01, 6: 0.04, 5: 0.07, 4: 0.12, 3: 0.25, 2: 0.5}


@pytest.mark.parametrize("bits", QUANTIZED)
def test_layer_round_trip(tiny_dir, bits):
    layer = ModelShard.load(tiny_dir, 0, 1, max_slots=1, max_len=8).layers[0]
    originals = [
        (name, lin.weight.clone(), None if lin.bias is None else lin.bias.clone())
        for name, _, _, lin in linear_children(layer)
    ]
    assert len(originals) >= 4
    quantize_layer(layer, bits, group_size=32)
    swapped = linear_children(layer)
    assert swapped == []  # every nn.Linear replaced
    quants = [m for m in layer.modules() if isinstance(m, QuantLinear)]
    assert len(quants) == len(originals)
    assert len({id(q.workspace) for q in quants}) == 1  # one shared work buffer per layer call
    for (name, weight, bias), q in zip(originals, quants):
        assert q.bits.count == bits and q.group_size == 32
        rel = (q.dequantize() - weight).norm() / weight.norm()
        assert rel < ROUND_TRIP_BOUND[bits], f"{name}: relative weight error {rel:.4f} at {bits} bits"
        if bias is not None:
            assert torch.equal(q.bias, bias)


def test_sixteen_bits_leaves_layer_untouched(tiny_dir):
    layer = ModelShard.load(tiny_dir, 0, 1, max_slots=1, max_len=8).layers[0]
    before = [slot.linear for slot in linear_children(layer)]
    assert quantize_layer(layer, 16) is layer
    assert [slot.linear for slot in linear_children(layer)] == before
