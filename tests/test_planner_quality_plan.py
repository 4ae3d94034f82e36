"""The planner's solver asked for the least summed indicator in the memory of uniform 4-bit."""

from __future__ import annotations

from planner.catalog import builtin_model
from planner.indicator import Indicator
from planner.quality_plan import least_indicator_plan
from pqmesh.types import Bits


def _indicator(layers: int, sensitive: dict[int, float], cheap3: set[int]) -> Indicator:
    rows = []
    for i in range(layers):
        four = sensitive.get(i, 0.01)
        rows.append({Bits.B16: 0.0, Bits.B8: 0.0, Bits.B4: four, Bits.B3: four + (0.001 if i in cheap3 else 0.2)})
    return Indicator(tuple(rows))


def test_a_sensitive_layer_goes_to_8_bits_paid_for_by_cheap_3_bit_layers():
    for name in ("smollm2-135m-instruct", "gemma-3-270m"):
        shape = builtin_model(name)
        layers = shape.num_layers
        cheap = set(range(1, 9))
        found = least_indicator_plan(shape, _indicator(layers, {0: 1.0}, cheap))
        assert found.bits[0] == Bits.B8
        assert {i for i, b in enumerate(found.bits) if b == Bits.B3} <= cheap
        assert found.indicator_total < found.uniform_total - 0.9
        assert found.memory_bytes <= found.budget_bytes and found.weight_bytes <= found.uniform_weight_bytes


def test_without_a_layer_worth_8_bits_uniform_4_stays():
    shape = builtin_model("gemma-3-270m")
    found = least_indicator_plan(shape, _indicator(shape.num_layers, {}, set()))
    assert found.bits == (Bits.B4,) * shape.num_layers
    assert found.memory_bytes == found.budget_bytes and found.indicator_total == found.uniform_total


def _wide_indicator(layers: int, sensitive: dict[int, float], cheap3: set[int]) -> Indicator:
    rows = []
    for i in range(layers):
        four = sensitive.get(i, 0.01)
        rows.append({Bits.B6: four / 8, Bits.B5: four / 4, Bits.B4: four,
                     Bits.B3: four + (0.001 if i in cheap3 else 0.2)})
    return Indicator(tuple(rows))


def test_other_widths_are_taken_only_where_they_pay():
    """Allowing 6/5/3 bits must not push uniform 4 out of its own memory; a layer that gains much from
    5 or 6 bits is paid for by layers that lose little at 3."""
    shape = builtin_model("gemma-3-270m")
    allowed = (Bits.B6, Bits.B5, Bits.B4, Bits.B3)
    found = least_indicator_plan(shape, _wide_indicator(shape.num_layers, {}, set()), allowed=allowed)
    assert found.bits == (Bits.B4,) * shape.num_layers
    sensitive = least_indicator_plan(shape, _wide_indicator(shape.num_layers, {5: 1.0}, {1, 2, 3}), allowed=allowed)
    assert sensitive.bits[5] in (Bits.B6, Bits.B5) and sensitive.indicator_total < sensitive.uniform_total - 0.5
    assert {i for i, b in enumerate(sensitive.bits) if b == Bits.B3} <= {1, 2, 3}
    assert sensitive.memory_bytes <= sensitive.budget_bytes
