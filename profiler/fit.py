"""Fit the planner's per-layer latency model to measurements: non-negative least squares on
relative error.

Model (`planner.devices.LatencyModel`): seconds per decoder layer and micro-batch =
sum(coefficient x feature). Features per phase, from `planner.devices.FEATURES`:

- prefill: const, batch, tokens (= batch x prompt), tokens*context (= batch x prompt^2): fixed
  launch cost, per-sequence work, linear layers per token, attention per token per key;
- decode: const, tokens (= batch), tokens*context (= batch x (cached + new)): weight streaming,
  per-token linear work, KV reads. "batch" equals "tokens" in decode, so it is left out (the two
  columns would be identical and the split between them arbitrary).

Why non-negative: every term is a cost, so a negative coefficient only appears when the fit trades
one term against another to chase noise, and then predictions go negative or absurd outside the
grid (a small batch, a longer context). Why relative error: measured times span three or more orders
of magnitude across the grid; unweighted least squares would fit the largest points and leave the
batch-1 decode points, which the planner uses most, tens of percent off. Rows are divided by the
measured time, so the fit minimises sum(((prediction - measured) / measured)^2).

Solver: Lawson-Hanson active set (the classic NNLS, as in scipy.optimize.nnls; scipy is not a
dependency of pqmesh). With at most four columns it converges in a handful of iterations and, unlike
"least squares then clip negatives and refit", it finds the true constrained optimum. Columns are
scaled to unit norm first, since the features differ by up to ten orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from planner.devices import LatencyModel
from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.types import Bits, Phase

PHASE_FEATURES: dict[Phase, tuple[str, ...]] = {
    Phase.PREFILL: ("const", "batch", "tokens", "tokens*context"),
    Phase.DECODE: ("const", "tokens", "tokens*context"),
}


@dataclass(frozen=True)
class Sample:
    """One measured point: `length` is the prompt (prefill) or the context incl. the new token (decode)."""

    phase: Phase
    batch: int
    length: int
    seconds: float

    def __post_init__(self) -> None:
        if self.batch < 1 or self.length < 1:
            raise InvalidArgument(f"sample batch and length must be >= 1, got {self.batch} x {self.length}")
        if not self.seconds > 0 or not np.isfinite(self.seconds):
            raise InvalidArgument(f"sample time must be a positive number of seconds, got {self.seconds}")

    def to_json(self) -> dict:
        return {"phase": self.phase.name.lower(), "batch": self.batch, "length": self.length, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> Sample:
        return cls(Phase.parse(data["phase"]), int(data["batch"]), int(data["length"]), float(data["seconds"]))


def planner_inputs(phase: Phase, batch: int, length: int) -> tuple[int, int, int]:
    """(batch, tokens, context) as `LatencyModel.seconds` takes them for one workload point."""
    if phase == Phase.PREFILL:
        return batch, batch * length, length
    return batch, batch, length


def feature_row(phase: Phase, batch: int, length: int, features: Sequence[str]) -> list[float]:
    b, tokens, context = planner_inputs(phase, batch, length)
    values = {"const": 1.0, "batch": float(b), "tokens": float(tokens), "tokens*context": float(tokens) * context}
    return [values[f] for f in features]


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b||_2 subject to x >= 0 (Lawson and Hanson, 1974, chapter 23)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rows, cols = a.shape
    x = np.zeros(cols)
    passive = np.zeros(cols, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(1.0, np.linalg.norm(a, 1)) * max(rows, cols)
    for _ in range(max_iter or 3 * cols + 10):
        w = a.T @ (b - a @ x)  # negative gradient
        candidates = ~passive & (w > tol)
        if not candidates.any():
            return x
        passive[np.argmax(np.where(candidates, w, -np.inf))] = True
        while passive.any():
            z = np.zeros(cols)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # step back towards x until the first passive variable hits zero; drop it
            blocking = passive & (z <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def fit_coefficients(rows: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the summed squared relative error."""
    weighted = rows / seconds[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    norms[norms == 0] = 1.0
    scaled = nnls(weighted / norms, np.ones(len(seconds)))
    return scaled / norms


def fit_latency(bits: Bits, phase: Phase, samples: Sequence[Sample]) -> LatencyModel:
    """The fitted `LatencyModel` of one (bits, phase) from its samples; needs one more point than features."""
    features = PHASE_FEATURES[phase]
    chosen = [s for s in samples if s.phase == phase]
    if len(chosen) < len(features) + 1:
        raise InvalidArgument(f"{bits.value}-bit {phase.name.lower()}: {len(chosen)} measured points cannot fit "
                              f"{len(features)} coefficients; use a grid with at least {len(features) + 1} points")
    rows = np.array([feature_row(phase, s.batch, s.length, features) for s in chosen])
    seconds = np.array([s.seconds for s in chosen])
    coefficients = fit_coefficients(rows, seconds)
    model = LatencyModel(bits, phase, features, tuple(float(c) for c in coefficients), calibrated=True)
    check_sane(model, chosen)
    return model


def predict(model: LatencyModel, batch: int, length: int) -> float:
    return model.seconds(*planner_inputs(model.phase, batch, length))


def check_sane(model: LatencyModel, samples: Sequence[Sample]) -> None:
    """Predictions must be positive at batch 1 and at every measured point (so also at the grid edges)."""
    lengths = sorted({s.length for s in samples})
    probes = [(1, lengths[0]), (1, lengths[-1])] + [(s.batch, s.length) for s in samples]
    bad = [(b, n) for b, n in probes if not predict(model, b, n) > 0]
    if bad:
        raise FailedPrecondition(f"{model.bits.value}-bit {model.phase.name.lower()} fit predicts no time at "
                                 f"(batch, length) {bad}; the measurements are too noisy: rerun on an idle device")


def relative_errors(model: LatencyModel, samples: Sequence[Sample]) -> list[float]:
    """|predicted - measured| / measured for each sample of the model's phase."""
    return [abs(predict(model, s.batch, s.length) - s.seconds) / s.seconds for s in samples if s.phase == model.phase]
