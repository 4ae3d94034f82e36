"""Time decoder layers through the stage's own execution path.

A `TimedShard` is a `ModelShard` of `layers` decoder layers of the model's shape with random weights
(built on the meta device, materialized on the target device, quantized by the same
`pqmesh.quant.layer` hook a stage uses) and no embeddings or head: a middle stage. Its `prefill` and
`decode` are what a stage server runs per micro-batch, so per-step overheads (attention masks, rotary
tables, KV writes) are included; one layer's time is the shard's time over `layers`.

Decode at context c needs c - 1 cached tokens per slot: the cache lengths are set directly instead of
running a prefill first (the cache contents do not change the arithmetic), so each decode repeat costs
one decode step. Each point gets `warmup` untimed calls, then `repeats` timed rounds (each round a
mean over enough calls to last `min_seconds / repeats`); the median round counts. On CUDA every timed
stretch is bracketed by `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from pqmesh.model.families import family_for
from pqmesh.model.kv_cache import StaticKVCache
from pqmesh.model.shard import ModelShard
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE, uniform_hook
from pqmesh.types import Bits, Phase
from profiler.fit import Sample
from profiler.target import DeviceTarget, ModelTarget

FIRST_LAYER = 1  # a middle layer index, as in a middle stage


@dataclass(frozen=True)
class TimingOptions:
    layers: int = 2
    warmup: int = 1
    repeats: int = 3
    min_seconds: float = 0.05
    max_calls: int = 50
    group_size: int = DEFAULT_GROUP_SIZE
    seed: int = 0


def _randomize(layer: nn.Module, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> nn.Module:
    """Materializes a meta-built layer: matrices ~ N(0, 1/fan_in), norm weights 1, biases 0."""
    layer = layer.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if param.dim() >= 2:
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) / param.shape[-1] ** 0.5
                param.copy_(values.to(device=device, dtype=dtype))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return layer.eval().requires_grad_(False)


def build_shard(model: ModelTarget, device: DeviceTarget, dtype: torch.dtype, bits: Bits,
                options: TimingOptions, max_slots: int, max_len: int) -> ModelShard:
    """A middle-stage shard of `options.layers` random layers at `bits`, KV cache for the grid."""
    config = model.hf_config(options.layers + 2)
    family = family_for(config)
    hook = uniform_hook(int(bits), options.group_size) if bits != Bits.B16 else None
    generator = torch.Generator().manual_seed(options.seed)
    layers = nn.ModuleList()
    for index in range(FIRST_LAYER, FIRST_LAYER + options.layers):
        with torch.device("meta"):
            layer = family.build_layer(index)
        layer = _randomize(layer, device.device, dtype, generator)
        layers.append(hook(index, layer) if hook else layer)
    kv_heads, head_dim = family.kv_shape()
    cache = StaticKVCache(options.layers, max_slots, max_len, kv_heads, head_dim, dtype, device.device)
    return ModelShard(
        family, FIRST_LAYER, FIRST_LAYER + options.layers, layers, None, None, None, cache, dtype, device.device
    )


class _Point:
    """One workload point on a shard: `prepare` resets the KV state (untimed), `run` is the timed call."""

    def __init__(self, shard: ModelShard, device: DeviceTarget, phase: Phase, batch: int, length: int,
                 generator: torch.Generator) -> None:
        self.shard, self.phase, self.batch, self.length = shard, phase, batch, length
        self.slots = list(range(batch))
        width = length if phase == Phase.PREFILL else 1
        self.hidden = torch.randn(batch, width, shard.hidden_size, generator=generator).to(
            device=device.device, dtype=shard.dtype
        )

    def prepare(self) -> None:
        if self.phase == Phase.PREFILL:
            self.shard.release(self.slots)
        else:  # length - 1 cached tokens per slot; their values do not change the arithmetic
            for s in self.slots:
                self.shard.cache.lengths[s] = self.length - 1

    def run(self) -> object:
        if self.phase == Phase.PREFILL:
            return self.shard.prefill(self.slots, self.hidden, [self.length] * self.batch)
        return self.shard.decode(self.slots, self.hidden)

    def measure(self, sync: Callable[[], None], min_seconds: float, max_calls: int) -> float:
        """Mean seconds per call over at least one call and about `min_seconds`."""
        total, calls = 0.0, 0
        while calls == 0 or (total < min_seconds and calls < max_calls):
            self.prepare()
            sync()
            started = time.perf_counter()
            self.run()
            sync()
            total += time.perf_counter() - started
            calls += 1
        return total / calls


def time_points(shard: ModelShard, device: DeviceTarget, points: Iterable[tuple[Phase, int, int]],
                options: TimingOptions, progress: Callable[[], None] | None = None) -> list[Sample]:
    """Seconds per layer at each (phase, batch, length) point; the median of `options.repeats` rounds.

    Rounds sweep all points in turn (rather than repeating one point back to back), so a burst of
    load from another process spoils one round of several points, which the median then drops,
    instead of every repeat of one point.
    """
    generator = torch.Generator().manual_seed(options.seed + 1)
    timed = [_Point(shard, device, phase, batch, length, generator) for phase, batch, length in points]
    for point in timed:
        for _ in range(options.warmup):
            point.prepare()
            point.run()
        if progress:
            progress()  # the warm-up pass counts as one round on the progress bar
    device.synchronize()
    rounds: list[list[float]] = [[] for _ in timed]
    for _ in range(options.repeats):
        for point, seconds in zip(timed, rounds):
            seconds.append(point.measure(device.synchronize, options.min_seconds / options.repeats, options.max_calls))
            if progress:
                progress()
    for point in timed:
        point.prepare()
        shard.release(point.slots)
    return [Sample(p.phase, p.batch, p.length, statistics.median(r) / len(shard.layers)) for p, r in zip(timed, rounds)]
