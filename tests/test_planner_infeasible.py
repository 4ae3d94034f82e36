"""When nothing fits, the planner says which device is short by how much, and what would fit."""

from __future__ import annotations

import re

import pytest

from planner.cluster import Cluster, ClusterEntry, Workload
from planner.diagnose import fits
from planner.indicator import Quality
from planner.request import PlanInputs
from planner.search import plan
from pqmesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from pqmesh.types import Bits


def _plan(model, devices, workload=Workload(32, 512, 100), quality=Quality(), bits=()):
    cluster = Cluster(tuple(ClusterEntry(t, n) for t, n in devices))
    problem = PlanInputs(model, cluster, workload, quality, allowed_bits=bits).to_problem()
    return problem, lambda: plan(problem, time_limit=5)


def test_memory_shortfall_names_device_bytes_and_fixes():
    problem, run = _plan("opt-30b", [("T4", 2)])
    with pytest.raises(ResourceExhausted) as err:
        run()
    message = str(err.value)
    assert "t4:" in message and "short by" in message and "GiB" in message
    batch = int(re.search(r"batch of at most (\d+) sequences", message).group(1))
    prompt = int(re.search(r"prompts of at most (\d+) tokens", message).group(1))
    assert "one more t4 device" in message
    # the suggested limits really fit, one more does not
    from dataclasses import replace

    assert fits(replace(problem, workload=Workload(batch, 512, 100)))
    assert not fits(replace(problem, workload=Workload(batch + 1, 512, 100)))
    assert fits(replace(problem, workload=Workload(32, prompt, 100)))
    assert not fits(replace(problem, workload=Workload(32, prompt + 1, 100)))


def test_model_larger_than_cluster_even_at_2_bits():
    _, run = _plan("opt-66b", [("T4", 1)])
    with pytest.raises(ResourceExhausted, match=r"at 2 bits.*more devices with at least \d+\.\d+ GiB"):
        run()


def test_restricted_bits_suggest_lower_bits():
    _, run = _plan("opt-30b", [("T4", 2)], bits=(Bits.B16, Bits.B8, Bits.B4))
    with pytest.raises(ResourceExhausted, match=r"at 4 bits.*bits down to 2 \(--bits\)"):
        run()


def test_unreachable_quality_bound_gives_the_reachable_one():
    _, run = _plan("opt-13b", [("V100-32G", 1)], quality=Quality(bound=0.001), bits=(Bits.B8, Bits.B4))
    with pytest.raises(FailedPrecondition, match=r"quality bound 0\.001.*at least 0\.00390625"):
        run()


def test_more_devices_than_layers_is_rejected():
    with pytest.raises(InvalidArgument, match="remove devices"):
        _plan("bloom-3b", [("T4", 31)])
