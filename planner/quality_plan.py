"""The planner's solver asked for quality at a memory size: the plan of least summed indicator whose
stage fits the memory uniform ``budget_bits`` needs.

One device (a CPU roofline; its speed only breaks ties) whose capacity is exactly the predicted total
of one stage holding every layer at ``budget_bits`` (weights, KV cache, activations, embeddings and
head, workspace; no reserve), and a quality weight so large that the job time only breaks ties:
`planner.search.plan` then returns the layer widths with the least summed indicator that fit. The
workspace of widths below 4 bits is larger than 4-bit's, so such a plan's layer weights are at most
uniform ``budget_bits``'s. This is what `bench/quant_quality.py` evaluates as the "planner" mixed plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from planner.cluster import Device, Network, Workload
from planner.devices import DeviceProfile, Roofline
from planner.indicator import Indicator, Quality
from planner.model_shapes import ModelShape
from planner.problem import Problem, evaluate
from planner.search import plan
from pqmesh.plan import PipelinePlan, StagePlan
from pqmesh.types import Bits, allowed_bits

log = structlog.get_logger(__name__)
QUALITY_WEIGHT = 1e6  # seconds per unit of indicator: quality decides, time only breaks ties
DEVICE = "budget"


@dataclass(frozen=True)
class QualityPlan:
    bits: tuple[Bits, ...]
    indicator_total: float
    uniform_total: float  # the indicator summed at uniform budget_bits
    memory_bytes: int  # the stage's predicted total
    budget_bytes: int  # uniform budget_bits' predicted total: the device's capacity
    weight_bytes: int
    uniform_weight_bytes: int


def _problem(shape: ModelShape, indicator: Indicator, allowed, capacity: int, dtype: str, tokens: int) -> Problem:
    profile = DeviceProfile(name=DEVICE, device_type="cpu", memory_bytes=capacity, roofline=Roofline(0.5, 20.0),
                            reserve_bytes=0)
    return Problem(shape, (Device(DEVICE, profile, "localhost"),), Network(bandwidth_gbps=10, latency_us=50),
                   Workload(1, tokens, 1), indicator, Quality(theta=QUALITY_WEIGHT), tuple(allowed), dtype=dtype)


def least_indicator_plan(shape: ModelShape, indicator: Indicator, allowed=(Bits.B8, Bits.B4, Bits.B3),
                         budget_bits: Bits = Bits.B4, dtype: str = "float32", tokens: int = 512,
                         time_limit_s: float = 20.0) -> QualityPlan:
    """Per layer a width of ``allowed`` with the least summed ``indicator``, in the memory of uniform
    ``budget_bits`` (a stage of all layers in ``dtype``, one sequence of ``tokens``)."""
    allowed = tuple(Bits(int(b)) for b in allowed)
    uniform = PipelinePlan((StagePlan(DEVICE, 0, shape.num_layers, (budget_bits,) * shape.num_layers),), 1, 1)
    probe = _problem(shape, indicator, allowed_bits((*allowed, budget_bits)), 1 << 50, dtype, tokens)
    budget = evaluate(probe, uniform).memory[0]
    problem = _problem(shape, indicator, allowed, budget.total, dtype, tokens)
    result = plan(problem, time_limit_s, baselines={})  # the baselines (uniform 8, ...) need not be rated
    chosen = evaluate(problem, result.plan).memory[0]
    bits = tuple(result.plan.bits_per_layer)
    found = QualityPlan(bits, indicator.total(bits), indicator.total(uniform.bits_per_layer), chosen.total,
                        budget.total, chosen.weights, budget.weights)
    log.info("quality_plan", model=shape.name, bits=[int(b) for b in bits], indicator=found.indicator_total,
             uniform=found.uniform_total, memory=chosen.total, budget=budget.total, gap=result.optimality_gap)
    return found
