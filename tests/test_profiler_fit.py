"""The profiler's pure parts: NNLS, the latency fit, held-out points and the link fit (no timing)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from planner.devices import LatencyModel
from pqmesh.errors import InvalidArgument
from pqmesh.types import Bits, Phase
from profiler.fit import PHASE_FEATURES, Sample, fit_latency, nnls, predict, relative_errors
from profiler.grid import PRESETS, Grid, held_out, parse_ints
from profiler.link import fit_link

GRID = PRESETS["cpu"]


def _synthetic(model: LatencyModel, grid: Grid) -> list[Sample]:
    return [Sample(model.phase, b, n, predict(model, b, n)) for b, n in grid.points(model.phase)]


@pytest.mark.parametrize("phase, coefficients", [
    (Phase.PREFILL, (2e-4, 3e-6, 4e-7, 5e-10)),
    (Phase.PREFILL, (1e-4, 0.0, 2e-6, 0.0)),  # a zero coefficient stays exactly zero
    (Phase.DECODE, (3e-4, 2e-5, 1e-8)),
])
def test_fit_recovers_known_coefficients(phase, coefficients):
    truth = LatencyModel(Bits.B4, phase, PHASE_FEATURES[phase], coefficients)
    fitted = fit_latency(Bits.B4, phase, _synthetic(truth, GRID))
    assert fitted.features == truth.features and fitted.calibrated
    np.testing.assert_allclose(fitted.coefficients, coefficients, rtol=1e-9, atol=1e-16)
    assert max(relative_errors(fitted, _synthetic(truth, GRID))) < 1e-9


def test_nnls_finds_the_constrained_optimum():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.normal(size=(12, 4)), rng.normal(size=12)
        x = nnls(a, b)
        assert (x >= 0).all()
        # brute force: best unconstrained solution on every support whose solution is non-negative
        best = np.linalg.norm(b)
        for k in range(1, 5):
            for support in itertools.combinations(range(4), k):
                z = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
                if (z >= 0).all():
                    best = min(best, np.linalg.norm(a[:, support] @ z - b))
        assert np.linalg.norm(a @ x - b) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_noisy_fit_stays_positive_at_batch_one_and_grid_edges():
    rng = np.random.default_rng(0)
    truth = LatencyModel(Bits.B16, Phase.DECODE, PHASE_FEATURES[Phase.DECODE], (5e-4, 1e-5, 2e-9))
    noisy = [Sample(s.phase, s.batch, s.length, s.seconds * rng.uniform(0.8, 1.25)) for s in _synthetic(truth, GRID)]
    fitted = fit_latency(Bits.B16, Phase.DECODE, noisy)
    assert all(c >= 0 for c in fitted.coefficients)
    for batch, length in [
        (1, 2),
        (1, GRID.contexts[0]),
        (1, GRID.contexts[-1]),
        (GRID.decode_batches[-1], GRID.contexts[-1]),
    ]:
        assert predict(fitted, batch, length) > 0
    assert np.mean(relative_errors(fitted, _synthetic(truth, GRID))) < 0.1  # closer to the truth than the noise


def test_relative_weighting_keeps_small_points_accurate():
    # the truth has a knee the model cannot express; relative weighting keeps batch 1 close anyway
    points = GRID.points(Phase.DECODE)
    samples = [Sample(Phase.DECODE, b, c, 1e-3 + 1e-4 * b ** 1.3 + 1e-9 * b * c) for b, c in points]
    fitted = fit_latency(Bits.B16, Phase.DECODE, samples)
    small = [s for s in samples if s.batch == 1]
    assert max(relative_errors(fitted, small)) < 0.1


def test_fit_needs_enough_points():
    with pytest.raises(InvalidArgument, match="cannot fit"):
        fit_latency(Bits.B16, Phase.PREFILL, [Sample(Phase.PREFILL, 1, 8, 1e-3)] * 3)


def test_held_out_points_are_off_grid_and_inside_its_ranges():
    for phase in (Phase.PREFILL, Phase.DECODE):
        points = held_out(GRID, phase, 20)
        assert len(points) == len(set(points)) == 20
        on_grid = set(GRID.points(phase))
        batches, lengths = zip(*GRID.points(phase))
        for b, n in points:
            assert (b, n) not in on_grid
            assert min(batches) <= b <= max(batches) and min(lengths) <= n <= max(lengths)
        assert held_out(GRID, phase, 20) == points  # deterministic


def test_grid_validation():
    assert parse_ints("4, 1,2,2", "--x") == (1, 2, 4)
    with pytest.raises(InvalidArgument, match="--x"):
        parse_ints("1,two", "--x")
    with pytest.raises(InvalidArgument, match="at least"):
        Grid((1,), (8,), (1, 2), (8, 16))
    assert Grid.from_json(GRID.to_json()) == GRID


def test_link_fit_recovers_latency_and_bandwidth():
    latency_s, bandwidth_gbps = 150e-6, 12.5
    samples = [(n, 2 * latency_s + n * 8 / (bandwidth_gbps * 1e9)) for n in (1 << k for k in range(10, 25, 2))]
    link = fit_link(samples, loopback=False, address="b:1")
    assert link.latency_us == pytest.approx(150, rel=1e-6)
    assert link.bandwidth_gbps == pytest.approx(12.5, rel=1e-6)
    assert "bandwidth_gbps = 12.5" in link.toml() and "latency_us = 150" in link.toml()
