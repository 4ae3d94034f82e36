"""One planning problem as plain data, and the cost model applied to a whole plan.

`Problem` fixes everything but the decisions (model, devices, network, workload, indicator,
quality, allowed bits, cost settings). `evaluate` predicts any `PipelinePlan` on it: memory per
stage, prefill and decode time (see `planner.latency` for the pipeline formulas), throughput =
batch x generation length / (prefill + decode), quality and the objective the solver minimizes:
prefill + decode seconds (+ theta x quality when a theta is given).

`dtype` is the stages' dtype (float16, bfloat16 or float32): it sets the bytes of every unquantized
value in the memory and latency models (`planner.memory.element_bytes`). Each device keeps its
profile's `reserve_bytes`, or `CostConfig.reserve_bytes` when the profile sets none.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, deque
from dataclasses import dataclass

from planner import latency as lat
from planner.cluster import Device, Network, Workload
from planner.devices import DeviceProfile
from planner.indicator import Indicator, Quality
from planner.memory import (
    DEFAULT_DTYPE,
    DEFAULT_RESERVE_BYTES,
    StageMemory,
    element_bytes,
    kv_cache_bytes_per_layer,
    layer_weight_bytes,
    stage_memory,
)
from planner.model_shapes import ModelShape
from planner.plans import Prediction
from pqmesh.errors import InvalidArgument
from pqmesh.length_groups import DEFAULT_WINDOW, take_prefill_group
from pqmesh.lengths import LengthHistogram
from pqmesh.plan import PipelinePlan
from pqmesh.types import ALL_BITS, Bits, Phase

QUALITY_TOLERANCE = 1e-6  # relative; the solver's integer scaling rounds indicators


#: Coordinator time per micro-batch reply (store, schedule, send the next): about 3 ms per decode step
#: measured on a 2-core CPU host (docs/BENCHMARKS.md, "Coordinator"); PlanRequest.coordinator_turnaround_us.
DEFAULT_COORDINATOR_S = 3e-3


@dataclass(frozen=True)
class CostConfig:
    reserve_bytes: int = DEFAULT_RESERVE_BYTES  # for devices whose profile sets no reserve_bytes
    decode_segments: int = lat.DEFAULT_DECODE_SEGMENTS
    coordinator_s: float = DEFAULT_COORDINATOR_S  # used by the whole-mesh replay (planner.mesh_costs)

    def __post_init__(self) -> None:
        if not 0 <= self.coordinator_s < 60:  # NaN fails too
            raise InvalidArgument(f"coordinator turn-around must be within [0, 60) s, got {self.coordinator_s}")


@dataclass(frozen=True)
class Problem:
    shape: ModelShape
    devices: tuple[Device, ...]
    network: Network
    workload: Workload
    indicator: Indicator
    quality: Quality  # resolved: theta or bound set
    allowed_bits: tuple[Bits, ...] = ALL_BITS
    cost: CostConfig = CostConfig()
    dtype: str = DEFAULT_DTYPE

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", self.dtype or DEFAULT_DTYPE)
        element_bytes(self.dtype)  # InvalidArgument names the supported dtypes
        if not self.devices:
            raise InvalidArgument("the cluster has no devices")
        if len(self.devices) > self.shape.num_layers:
            raise InvalidArgument(f"{len(self.devices)} devices but only {self.shape.num_layers} layers; "
                                  "every device holds at least one layer, so remove devices")
        self.indicator.check(self.shape.num_layers, self.allowed_bits, self.shape.name)

    def device(self, label: str) -> Device:
        found = self._by_label.get(label)
        if found is None:
            raise InvalidArgument(f"plan names device {label!r}, which is not in the cluster")
        return found

    @functools.cached_property
    def _by_label(self) -> dict[str, Device]:
        return {d.label: d for d in self.devices}

    def segments(self) -> list[tuple[int, float]]:
        return list(self._segments)

    @functools.cached_property
    def _segments(self) -> tuple[tuple[int, float], ...]:
        w = self.workload
        return tuple(lat.decode_segments(w.prompt_length, w.generation_length, self.cost.decode_segments))

    def prefill_length(self, micro_batch: int) -> int:
        """Tokens per row of a prefill micro-batch of `micro_batch` prompts, padding included: the prompt
        length, or with a prompt histogram the mean padded row length when the coordinator groups a
        sample of the job's prompts by length (`pqmesh.length_groups`) into micro-batches of that size."""
        w = self.workload
        return w.prompt_length if w.prompts is None else _padded_length(w.prompts, micro_batch)

    def micro_batches(self, size: int) -> int:
        return math.ceil(self.workload.batch_size / size)

    def capacity(self, device: Device) -> int:
        return device.profile.memory_bytes

    def reserve(self, device: Device) -> int:
        """Bytes kept free on `device`: its profile's reserve_bytes, else the cost config's default."""
        own = device.profile.reserve_bytes
        return self.cost.reserve_bytes if own is None else own

    @functools.cached_property
    def element(self) -> int:
        """Bytes per unquantized value in the stage dtype."""
        return element_bytes(self.dtype)


PADDING_SAMPLE = 2048  # prompts of the job drawn to measure the padding of length-grouped prefill


@functools.lru_cache(maxsize=1024)  # shared by the problems of one request (what-if, summaries, replicas)
def _padded_length(prompts: LengthHistogram, micro_batch: int) -> int:
    waiting = deque(prompts.sample(min(prompts.total, PADDING_SAMPLE)))
    rows = padded = 0
    while waiting:
        group = take_prefill_group(waiting, min(micro_batch, len(waiting)), DEFAULT_WINDOW, lambda n: n)
        rows, padded = rows + len(group), padded + len(group) * max(group)
    return max(1, math.ceil(padded / rows - 1e-9))


@functools.lru_cache(maxsize=65536)
def layer_cost(profile: DeviceProfile, shape: ModelShape, bits: Bits, phase: Phase, micro_batch: int,
               prompt_length: int, context: float, element: int = lat.DEFAULT_ELEMENT_BYTES) -> float:
    return lat.layer_seconds(profile, shape, bits, phase, micro_batch, prompt_length, context, element)


@functools.lru_cache(maxsize=4096)
def head_cost(
    profile: DeviceProfile, shape: ModelShape, micro_batch: int, element: int = lat.DEFAULT_ELEMENT_BYTES
) -> float:
    return lat.head_seconds(profile, shape, micro_batch, element)


def stage_seconds(problem: Problem, device: Device, counts: dict, last: bool, phase: Phase,
                  micro_batch: int, context: float) -> float:
    """One micro-batch through a stage holding counts[bits] layers at each bitwidth (+ head if last)."""
    s = problem.prefill_length(micro_batch)
    e = problem.element
    total = sum(
        n * layer_cost(device.profile, problem.shape, b, phase, micro_batch, s, context, e) for b, n in counts.items()
    )
    return total + (head_cost(device.profile, problem.shape, micro_batch, e) if last else 0.0)


def link_times(problem: Problem, order: list[Device], phase: Phase, micro_batch: int) -> list[float]:
    """Forward links between consecutive stages, plus (decode, > 1 stage) the token return link."""
    new_tokens = problem.prefill_length(micro_batch) if phase == Phase.PREFILL else 1
    nbytes = lat.activation_bytes(problem.shape, micro_batch, new_tokens, problem.element)
    net: Network = problem.network
    links = [net.link_seconds(nbytes, a.host == b.host) for a, b in zip(order, order[1:])]
    if phase == Phase.DECODE and len(order) > 1:
        links.append(net.link_seconds(lat.return_bytes(micro_batch), order[-1].host == order[0].host))
    return links


def phase_seconds(
    problem: Problem, order: list[Device], counts: list[dict], prefill_mb: int, decode_mb: int
) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of the whole job."""
    stages = _stage_times(problem, order, counts, Phase.PREFILL, prefill_mb, problem.prefill_length(prefill_mb))
    prefill = lat.prefill_seconds(
        stages + link_times(problem, order, Phase.PREFILL, prefill_mb), problem.micro_batches(prefill_mb)
    )
    links = link_times(problem, order, Phase.DECODE, decode_mb)
    decode = 0.0
    for rounds, context in problem.segments():
        stages = _stage_times(problem, order, counts, Phase.DECODE, decode_mb, context)
        decode += rounds * lat.decode_round_seconds(stages + links, problem.micro_batches(decode_mb))
    return prefill, decode


def _stage_times(problem: Problem, order: list[Device], counts: list[dict], phase: Phase, micro_batch: int,
                 context: float) -> list[float]:
    """`stage_seconds` of every stage; identical devices holding the same counts computed once."""
    last, memo, out = len(order) - 1, {}, []
    for i, (d, c) in enumerate(zip(order, counts)):
        key = (id(d.profile), tuple(sorted(c.items())), i == last)
        if key not in memo:
            memo[key] = stage_seconds(problem, d, c, i == last, phase, micro_batch, context)
        out.append(memo[key])
    return out


@dataclass(frozen=True)
class Evaluation:
    prediction: Prediction
    memory: tuple[StageMemory, ...]
    capacity: tuple[int, ...]
    objective: float
    quality_ok: bool

    @property
    def fits(self) -> bool:
        return all(m.total <= c for m, c in zip(self.memory, self.capacity))

    @property
    def feasible(self) -> bool:
        return self.fits and self.quality_ok

    def shortfalls(self) -> list[int]:
        return [m.total - c for m, c in zip(self.memory, self.capacity)]


def evaluate(problem: Problem, plan: PipelinePlan) -> Evaluation:
    """The cost model applied to `plan`."""
    if plan.num_layers != problem.shape.num_layers:
        raise InvalidArgument(f"plan covers {plan.num_layers} layers; the model has {problem.shape.num_layers}")
    order = [problem.device(s.device) for s in plan.stages]
    counts = [dict(Counter(s.bits)) for s in plan.stages]
    prefill, decode = phase_seconds(problem, order, counts, plan.prefill_micro_batch, plan.decode_micro_batch)
    w, last, memo = problem.workload, len(order) - 1, {}
    keys = [(tuple(sorted(c.items())), i == 0, i == last, problem.reserve(d))
            for i, (c, d) in enumerate(zip(counts, order))]
    for key, s in zip(keys, plan.stages):  # memory depends on the counts, not on the layers' order
        if key not in memo:
            memo[key] = stage_memory(problem.shape, w, list(s.bits), key[1], key[2], plan.prefill_micro_batch,
                                     plan.decode_micro_batch, key[3], problem.element)
    memory = tuple(memo[key] for key in keys)
    quality = problem.indicator.total(plan.bits_per_layer)
    throughput = w.batch_size * w.generation_length / (prefill + decode)
    prediction = Prediction(throughput, prefill, decode, tuple(m.total for m in memory), quality)
    q = problem.quality
    objective = prefill + decode + (q.theta * quality if q.theta is not None else 0.0)
    quality_ok = q.bound is None or quality <= q.bound * (1 + QUALITY_TOLERANCE) + QUALITY_TOLERANCE
    return Evaluation(prediction, memory, tuple(problem.capacity(d) for d in order), objective, quality_ok)


def layer_bytes(problem: Problem, bits: Bits) -> int:
    """Weights + KV cache of one decoder layer at `bits` for this workload."""
    w, e = problem.workload, problem.element
    return layer_weight_bytes(problem.shape, bits, element=e) + kv_cache_bytes_per_layer(
        problem.shape, w.batch_size, w.max_context, e
    )
