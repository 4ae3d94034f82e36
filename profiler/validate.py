"""Held-out validation: time workload points the fit never saw (inside the grid's ranges, off its
points) and report the absolute percentage error of the profile's predictions per (phase, bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.devices import DeviceProfile
from pqmesh.errors import InvalidArgument
from pqmesh.types import Bits, Phase
from profiler.fit import Sample, fit_latency, predict
from profiler.grid import Grid, held_out
from profiler.run import ProfileRequest, grid_points, measure_bits, progress_bar


@dataclass(frozen=True)
class ErrorRow:
    phase: Phase
    bits: int
    points: int
    mean_ape: float  # mean absolute percentage error, in percent
    max_ape: float

    def to_json(self) -> dict:
        return {"phase": self.phase.name.lower(), "bits": self.bits, "points": self.points,
                "mean_ape_percent": round(self.mean_ape, 3), "max_ape_percent": round(self.max_ape, 3)}


@dataclass(frozen=True)
class Check:
    """One held-out point: measured and predicted seconds per layer."""

    bits: int
    sample: Sample
    predicted: float

    @property
    def ape(self) -> float:
        return abs(self.predicted - self.sample.seconds) / self.sample.seconds * 100

    def to_json(self) -> dict:
        return {
            "bits": self.bits,
            **self.sample.to_json(),
            "predicted": self.predicted,
            "ape_percent": round(self.ape, 3),
        }


def validation_points(grid: Grid, count: int, seed: int = 0) -> list[tuple[Phase, int, int]]:
    return [(phase, b, n) for phase in (Phase.PREFILL, Phase.DECODE) for b, n in held_out(grid, phase, count, seed)]


def run_checks(device_profile: DeviceProfile, request: ProfileRequest, points) -> list[Check]:
    """Measures `points` at every bitwidth of `request` and compares with the profile's predictions."""
    checks = []
    with progress_bar(len(points) * len(request.bits) * (request.options.repeats + 1)) as bar:
        for bits in request.bits:
            models = {p: device_profile.fitted(device_profile.model, bits, p) for p in (Phase.PREFILL, Phase.DECODE)}
            if None in models.values():
                raise InvalidArgument(f"profile {device_profile.name!r} has no fitted {int(bits)}-bit models; "
                                      f"it holds {sorted({int(m.bits) for m in device_profile.latency})}")
            for sample in measure_bits(request, bits, points, bar):
                checks.append(Check(int(bits), sample, predict(models[sample.phase], sample.batch, sample.length)))
    return checks


def interleaved_checks(request: ProfileRequest, points) -> list[Check]:
    """Grid and held-out `points` timed in the same rounds on one shard per bitwidth; the fit sees the
    grid samples only. Isolates the model's error from drift between a profile and a later check
    (clocks, other load), which `run_checks` against a stored profile includes."""
    fit_points = grid_points(request.grid)
    checks = []
    with progress_bar((len(fit_points) + len(points)) * len(request.bits) * (request.options.repeats + 1)) as bar:
        for bits in request.bits:
            samples = measure_bits(request, bits, fit_points + list(points), bar)
            fitted = {p: fit_latency(bits, p, samples[:len(fit_points)]) for p in (Phase.PREFILL, Phase.DECODE)}
            checks += [
                Check(int(bits), s, predict(fitted[s.phase], s.batch, s.length)) for s in samples[len(fit_points) :]
            ]
    return checks


def summarize(checks: list[Check]) -> list[ErrorRow]:
    rows = []
    for phase in (Phase.PREFILL, Phase.DECODE):
        for bits in sorted({c.bits for c in checks}, reverse=True):
            apes = [c.ape for c in checks if c.bits == bits and c.sample.phase == phase]
            if apes:
                rows.append(ErrorRow(phase, bits, len(apes), sum(apes) / len(apes), max(apes)))
    return rows


def overall(checks: list[Check], phase: Phase | None = None) -> tuple[float, float]:
    """(mean, max) absolute percentage error over `checks` (of one phase if given)."""
    apes = [c.ape for c in checks if phase is None or c.sample.phase == phase]
    if not apes:
        return math.nan, math.nan
    return sum(apes) / len(apes), max(apes)


def render(rows: list[ErrorRow]) -> str:
    lines = [f"{'phase':<9}{'bits':>5}{'points':>8}{'mean APE':>11}{'max APE':>10}"]
    for r in rows:
        lines.append(f"{r.phase.name.lower():<9}{r.bits:>5}{r.points:>8}{r.mean_ape:>10.2f}%{r.max_ape:>9.2f}%")
    return "\n".join(lines) + "\n"


def bits_of(device_profile: DeviceProfile) -> tuple[Bits, ...]:
    return tuple(sorted({m.bits for m in device_profile.latency}, reverse=True))
