"""A device can be a set of CPU cores: affinity lists, refusals, and a real pinned `pqmesh-stage`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localmesh.mesh import cpu_layout
from localmesh.processes import Child
from pqmesh import capacity
from pqmesh.cpuset import available_cpus, check_available, check_disjoint, format_cpus, parse_cpus
from pqmesh.errors import InvalidArgument

BIN = Path(sys.executable).parent


def test_affinity_lists_parse_and_format():
    assert parse_cpus("0-3,6") == (0, 1, 2, 3, 6)
    assert parse_cpus(" 5, 1-2 ,2") == (1, 2, 5)
    assert format_cpus((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    for bad, words in (("", "empty"), ("a-b", "cannot read"), ("3-1", "backwards"), ("1,,2", "cannot read")):
        with pytest.raises(InvalidArgument, match=words):
            parse_cpus(bad)


def test_overlapping_and_missing_cores_are_refused_with_the_cores_named():
    with pytest.raises(InvalidArgument, match=r"'a' and 'b' both use cores 2-3"):
        check_disjoint({"a": (0, 1, 2, 3), "b": (2, 3, 4)})
    check_disjoint({"a": (0,), "b": (1,)})
    with pytest.raises(InvalidArgument, match=r"cores 7,9, which this process cannot use \(available: 0-3\)"):
        check_available((0, 7, 9), available=(0, 1, 2, 3))
    with pytest.raises(InvalidArgument, match="3 stages need 3 disjoint cores"):
        cpu_layout((100, 100, 100), cores=(0, 1))
    assert [d.cpus for d in cpu_layout((300, 200), cores=(0, 1, 2, 3))] == [(0, 1), (2, 3)]


def test_stage_default_budget_is_the_planners_capacity_rule():
    from stage_server.main import default_budget

    total = capacity.physical_memory_bytes()
    assert default_budget("cpu") == total - capacity.default_reserve("cpu", total)
    assert capacity.default_budget("cuda", 80 << 30) == (80 << 30) - (1 << 30)  # the planner's 1 GiB reserve


def test_pinned_stage_runs_on_its_cores_with_one_thread_per_core(tmp_path):
    core = available_cpus()[-1]
    child = Child("stage", [str(BIN / "pqmesh-stage"), "--listen", "127.0.0.1:0", "--cpus", str(core),
                            "--memory-budget", "64MiB", "--model-root", str(tmp_path)], tmp_path / "stage.log")
    try:
        child.wait_ready("stage_serving", timeout=120)
        assert os.sched_getaffinity(child.pid) == {core}
        serving = next(json.loads(line) for line in (tmp_path / "stage.log").read_text().splitlines()
                       if '"stage_serving"' in line)
        assert serving["cpus"] == str(core) and serving["threads"] == 1
        threads = os.listdir(f"/proc/{child.pid}/task")  # every thread the process started inherits the pinning
        assert all(os.sched_getaffinity(int(t)) == {core} for t in threads)
    finally:
        assert child.stop() == 0


def test_stage_refuses_cores_it_cannot_use(tmp_path):
    missing = max(available_cpus()) + 1000
    done = subprocess.run([str(BIN / "pqmesh-stage"), "--cpus", f"0,{missing}", "--model-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"cores {missing}, which this process cannot use" in done.stderr


def test_planner_refuses_devices_of_one_host_sharing_cores():
    from planner.cluster import Cluster, ClusterEntry, expand
    from planner.devices import DeviceProfile, Roofline

    profiles = {n: DeviceProfile(n, "cpu", 1 << 30, Roofline(1.0, 10.0), reserve_bytes=0, cpus=c)
                for n, c in (("a", "0-1"), ("b", "1-2"), ("c", "3"))}
    with pytest.raises(InvalidArgument, match=r"host 'h': devices 'a' and 'b' both use cores 1"):
        expand(Cluster((ClusterEntry("cpu", 1, "a", "h"), ClusterEntry("cpu", 1, "b", "h"))), profiles.get)
    with pytest.raises(InvalidArgument, match="is one device: count 1"):
        expand(Cluster((ClusterEntry("cpu", 2, "c", "h"),)), profiles.get)
    assert len(expand(Cluster((ClusterEntry("cpu", 1, "a", "h"), ClusterEntry("cpu", 1, "b", "other"),
                               ClusterEntry("cpu", 1, "c", "h"))), profiles.get)) == 3
