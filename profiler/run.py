"""One profile end to end: time (or read from the cache) every bitwidth's grid, fit a latency model
per (bits, phase), attach the roofline, and return the `DeviceProfile` the planner registers.

Besides the profile itself a run produces a `RunRecord` (written next to the profile JSON as
``<name>.run.json``): how it was measured (model source, device, dtype, grid, layers per timed shard)
and the raw samples, so `pqmesh profile validate` can re-measure the same setting.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
import torch

from planner.devices import DeviceProfile
from pqmesh.capacity import default_reserve
from pqmesh.cpuset import format_cpus
from pqmesh.errors import InvalidArgument
from pqmesh.types import Bits, Phase
from profiler.cache import ProfileCache, cache_key, shape_key
from profiler.fit import Sample, fit_latency
from profiler.grid import Grid
from profiler.roofline import roofline_for
from profiler.target import DeviceTarget, ModelTarget, dtype_name
from profiler.timing import TimingOptions, build_shard, time_points

log = structlog.get_logger(__name__)
RECORD_FORMAT = 1


@dataclass(frozen=True)
class ProfileRequest:
    model: ModelTarget
    device: DeviceTarget
    dtype: torch.dtype
    bits: tuple[Bits, ...]
    grid: Grid
    options: TimingOptions = TimingOptions()
    name: str = ""
    memory_bytes: int = 0
    reserve_bytes: int | None = None  # None: 0 with memory_bytes (a stage budget), else pqmesh.capacity's rule
    cpus: tuple[int, ...] = ()  # the cores this process is pinned to (--cpus); () = unpinned

    def __post_init__(self) -> None:
        if not self.bits:
            raise InvalidArgument("give at least one bitwidth to profile, e.g. --bits 16,8,4,3")
        if self.options.layers < 1:
            raise InvalidArgument(f"--layers must be >= 1, got {self.options.layers}")
        if self.memory_bytes < 0:
            raise InvalidArgument(f"--memory-bytes must be positive, got {self.memory_bytes}")
        if self.reserve_bytes is not None and not 0 <= self.reserve_bytes < self.capacity:
            raise InvalidArgument(f"--reserve-bytes {self.reserve_bytes} must be at least 0 and below the memory "
                                  f"the profile offers ({self.capacity} bytes)")

    @property
    def capacity(self) -> int:
        """memory_bytes of the profile: --memory-bytes, else the device's total."""
        return self.memory_bytes or self.device.memory_bytes

    @property
    def reserve(self) -> int:
        """reserve_bytes of the profile: --reserve-bytes; else 0 for a stage budget (--memory-bytes), else
        the reserve a stage leaves on this device by default (`pqmesh.capacity`)."""
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        return 0 if self.memory_bytes else default_reserve(self.device.kind, self.device.memory_bytes)

    def profile_name(self) -> str:
        if self.name:
            return self.name
        base = self.device.default_profile_name()
        return f"{base}s{format_cpus(self.cpus)}" if self.cpus else base

    def layer_key(self, bits: Bits) -> dict:
        o = self.options
        return cache_key(
            "layer",
            device=self.device.name,
            shape=shape_key(self.model.shape),
            dtype=dtype_name(self.dtype),
            bits=int(bits),
            group_size=o.group_size,
            layers=o.layers,
            grid=self.grid.to_json(),
            warmup=o.warmup,
            repeats=o.repeats,
            min_seconds=o.min_seconds,
        )


@dataclass(frozen=True)
class RunRecord:
    """How a profile was measured, and its samples."""

    model_source: str
    device: str
    dtype: str
    grid: Grid
    layers: int
    group_size: int
    samples: dict[int, tuple[Sample, ...]] = field(default_factory=dict)
    cache_hits: tuple[int, ...] = ()
    roofline_source: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, "model_source": self.model_source, "device": self.device, "dtype": self.dtype,
                "grid": self.grid.to_json(), "layers": self.layers, "group_size": self.group_size,
                "samples": {str(b): [s.to_json() for s in ss] for b, ss in self.samples.items()},
                "cache_hits": list(self.cache_hits), "roofline_source": self.roofline_source, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        if data.get("format") != RECORD_FORMAT:
            raise InvalidArgument(f"profile run record format {data.get('format')} is not {RECORD_FORMAT}; reprofile")
        return cls(
            data["model_source"],
            data["device"],
            data["dtype"],
            Grid.from_json(data["grid"]),
            int(data["layers"]),
            int(data["group_size"]),
            {int(b): tuple(Sample.from_json(s) for s in ss) for b, ss in data["samples"].items()},
            tuple(data.get("cache_hits", ())),
            data.get("roofline_source", ""),
            float(data.get("seconds", 0.0)),
        )


def record_path(profile_path: Path) -> Path:
    return profile_path.with_name(profile_path.stem + ".run.json")


def progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="profiling", unit="point", file=sys.stderr, disable=None, leave=False)


def grid_points(grid: Grid) -> list[tuple[Phase, int, int]]:
    return [(phase, b, n) for phase in (Phase.PREFILL, Phase.DECODE) for b, n in grid.points(phase)]


def measure_bits(request: ProfileRequest, bits: Bits, points, bar=None) -> list[Sample]:
    """Builds the timed shard at `bits` and times `points` ((phase, batch, length) triples)."""
    max_len = max(n for _, _, n in points)
    max_batch = max(b for _, b, _ in points)
    shard = build_shard(request.model, request.device, request.dtype, bits, request.options, max_batch, max_len)
    try:
        return time_points(shard, request.device, points, request.options, bar.update if bar else None)
    finally:
        del shard
        if request.device.kind == "cuda":
            torch.cuda.empty_cache()


def _roofline(request: ProfileRequest, cache: ProfileCache):
    key = cache_key("roofline", device=request.device.name, dtype=dtype_name(request.dtype))
    stored = cache.get(key)
    measured = (stored["tflops"], stored["gbs"]) if stored else None
    roofline, source = roofline_for(request.device, request.dtype, measured)
    if stored is None and source == "measured":
        cache.put(key, {"tflops": roofline.peak_fp16_tflops, "gbs": roofline.memory_bandwidth_gbs})
    return roofline, source


def profile(request: ProfileRequest, cache: ProfileCache) -> tuple[DeviceProfile, RunRecord]:
    started = time.perf_counter()
    points = grid_points(request.grid)
    samples: dict[int, tuple[Sample, ...]] = {}
    hits = []
    for bits in request.bits:
        found = cache.get_samples(request.layer_key(bits))
        if found is not None:
            samples[int(bits)] = tuple(found)
            hits.append(int(bits))
    misses = [b for b in request.bits if int(b) not in samples]
    with progress_bar(len(points) * len(misses) * (request.options.repeats + 1)) as bar:
        for bits in misses:
            measured = measure_bits(request, bits, points, bar)
            samples[int(bits)] = tuple(measured)
            cache.put_samples(request.layer_key(bits), measured)
            log.info("profile_bits_measured", bits=int(bits), points=len(measured))
    models = tuple(
        fit_latency(b, phase, samples[int(b)]) for b in request.bits for phase in (Phase.PREFILL, Phase.DECODE)
    )
    roofline, source = _roofline(request, cache)
    decode16 = next((m for m in models if m.bits == Bits.B16 and m.phase == Phase.DECODE), None)
    if decode16 is not None and source == "measured" and decode16.coefficients[0] > 0:
        roofline = replace(roofline, layer_overhead_us=decode16.coefficients[0] * 1e6)
    device_profile = DeviceProfile(
        name=request.profile_name(),
        device_type="cpu" if request.device.kind == "cpu" else request.device.name,
        memory_bytes=request.capacity, roofline=roofline, latency=models, model=request.model.name,
        reserve_bytes=request.reserve, dtype=dtype_name(request.dtype),
        model_fingerprint=request.model.shape.fingerprint, cpus=format_cpus(request.cpus))
    record = RunRecord(request.model.source, str(request.device.device), dtype_name(request.dtype), request.grid,
                       request.options.layers, request.options.group_size, samples, tuple(hits), source,
                       round(time.perf_counter() - started, 3))
    log.info("profile_done", name=device_profile.name, model=request.model.name, cache_hits=hits,
             seconds=record.seconds)
    return device_profile, record


def write(device_profile: DeviceProfile, record: RunRecord, path: Path) -> None:
    """The profile (proto3 JSON, what RegisterDevice takes) at `path`, its run record beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(device_profile.to_json()), indent=1) + "\n")
    record_path(path).write_text(json.dumps(record.to_json(), indent=1) + "\n")
