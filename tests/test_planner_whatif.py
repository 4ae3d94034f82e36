"""What-if: one device more or less of each type, the throughput-quality frontier and the largest batch
that fits, each with its plan: the library's pieces, PlannerService.WhatIf over real gRPC (a planner
on a loopback port 0) and through grpcurl and reflection, and `pqmesh plan --what-if --json`."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import grpc
import pytest
from google.protobuf import json_format
from test_planner_service import Planner, _grpcurl

from cli.main import main
from planner.cluster import Cluster, ClusterEntry, Workload
from planner.diagnose import fits, min_quality
from planner.max_batch import largest_batch
from planner.request import PlanInputs
from planner.whatif import device_changes, frontier_bounds, what_if
from pqmesh.api.planner.v1 import planner_pb2

BASE = {"model_name": "opt-13b", "devices": [{"device_type": "T4", "count": 2, "host": "a"},
                                             {"device_type": "V100-32G", "host": "b"}],
        "workload": {"batch_size": 8, "prompt_length": 64, "generation_length": 16}}
CLUSTER = """
[[device]]
type = "T4"
count = 2
host = "a"
[[device]]
type = "V100-32G"
host = "b"
"""


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    p = Planner(tmp_path_factory.mktemp("whatif") / "state")
    yield p
    p.stop()


def test_frontier_bounds_span_tightest_to_fastest():
    bounds = frontier_bounds(0.004, 16.0, 5)
    assert len(bounds) == 5 and bounds[0] == 0.004 and bounds[-1] == 16.0
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert frontier_bounds(0.0, 1.0, 5)[:2] == [0.0, 1e-3]  # a zero tightest bound comes first
    assert frontier_bounds(1.0, 1.0, 5) == [1.0]  # one quality is all there is


def test_device_changes_add_and_remove_one_of_each_type():
    cluster = Cluster((ClusterEntry("T4", 2, host="a"), ClusterEntry("T4", 1, host="c"), ClusterEntry("V100-32G")))
    changes = {(t, d): (host, c) for t, d, host, c in device_changes(cluster, ("A100-40G", "t4"))}
    assert set(changes) == {("t4", 1), ("t4", -1), ("v100-32g", 1), ("v100-32g", -1), ("a100-40g", 1)}
    assert changes[("t4", 1)][0] == "a" and changes[("t4", 1)][1].entries[0].count == 3
    assert changes[("t4", -1)][0] == "c" and [e.count for e in changes[("t4", -1)][1].entries] == [2, 1]
    assert len(changes[("a100-40g", 1)][1].entries) == 4
    alone = device_changes(Cluster((ClusterEntry("T4"),)))
    assert alone[1][3] == "removing it leaves no device"


def test_largest_batch_is_the_edge_of_memory():
    inputs = PlanInputs("opt-30b", Cluster((ClusterEntry("T4", 3, host="a"), ClusterEntry("V100-32G", host="b"))),
                        Workload(32, 512, 100))
    problem = replace(inputs.to_problem(), quality=replace(inputs.quality, bound=None, theta=0.0))
    found = largest_batch(problem)
    batch, bound = found.batch, found.bound
    assert not found.cut_short
    at = lambda b: replace(problem, workload=replace(problem.workload, batch_size=b))  # noqa: E731
    assert batch == bound and batch > 32 and fits(at(batch)) and not fits(at(batch + 1))


def test_largest_batch_and_tightest_bound_stop_at_their_deadline():
    inputs = PlanInputs("opt-30b", Cluster((ClusterEntry("T4", 3, host="a"), ClusterEntry("V100-32G", host="b"))),
                        Workload(32, 512, 100))
    problem = inputs.to_problem()  # the default quality bound: exact checks needed past memory
    started = time.monotonic()
    cut = largest_batch(problem, deadline=started)  # no time: memory's edge and the request's batch only
    assert cut.cut_short and cut.batch == 32 and cut.bound >= cut.batch
    assert min_quality(problem, deadline=started) == float("inf")
    assert time.monotonic() - started < 1.0
    full = largest_batch(problem)
    assert not full.cut_short and cut.batch <= full.batch <= full.bound <= cut.bound


def _check_answers(reply: dict) -> None:
    """A WhatIfResponse as proto3 JSON (grpcurl, MessageToDict): every answer and its plan."""
    base = reply["base"]["predicted"]["throughput_tokens_per_s"]
    changes = {(d["device_type"], d.get("delta", 0)): d for d in reply["devices"]}
    assert set(changes) == {("t4", 1), ("t4", -1), ("v100-32g", 1), ("v100-32g", -1)}
    for (_, delta), d in changes.items():
        if d.get("feasible"):
            assert len(d["plan"]["plan"]["stages"]) == 3 + delta
            got = d["plan"]["predicted"]["throughput_tokens_per_s"]
            assert d.get("marginal_tokens_per_s", 0.0) == pytest.approx(got - base)
        else:
            assert d["reason"]
    assert changes[("v100-32g", 1)]["feasible"] and changes[("v100-32g", 1)]["marginal_tokens_per_s"] > 0
    frontier = reply["frontier"]
    assert len(frontier) >= 5
    bounds = [f.get("quality_bound", 0.0) for f in frontier]
    assert bounds == sorted(bounds)
    for f in frontier:
        assert f["feasible"], f.get("reason")
        assert f["plan"]["predicted"].get("quality", 0.0) <= f.get("quality_bound", 0.0) * (1 + 1e-6) + 1e-12
    speeds = [f["plan"]["predicted"]["throughput_tokens_per_s"] for f in frontier]
    assert speeds[-1] > speeds[0]  # looser bounds buy throughput
    batch = reply["max_batch"]
    assert batch["feasible"] and 8 <= batch["batch_size"] <= batch["batch_size_bound"]
    plan, size = batch["plan"]["plan"], batch["batch_size"]
    assert size % plan["prefill_micro_batch"] == 0 and size % plan["decode_micro_batch"] == 0


def test_what_if_over_grpc(planner):
    """The default quality bound (uniform int4's): the largest batch is where that bound stops fitting."""
    request = planner_pb2.WhatIfRequest(base=json_format.ParseDict(BASE, planner_pb2.PlanRequest()),
                                        time_limit_seconds=60)
    reply = planner.stub.WhatIf(request)
    _check_answers(json_format.MessageToDict(reply, preserving_proto_field_name=True))
    assert reply.solve_seconds > 0
    assert reply.max_batch.plan.predicted.quality <= 1.0 + 1e-6  # the default bound: uniform int4's sum, 1


@pytest.mark.parametrize("request_fields, words", [
    ({}, "base"),
    ({"base": BASE, "frontier_points": 1}, "frontier points"),
    ({"base": BASE, "time_limit_seconds": 1000}, "time_limit_seconds"),
])
def test_what_if_bad_requests_are_invalid_argument(planner, request_fields, words):
    with pytest.raises(grpc.RpcError) as err:
        planner.stub.WhatIf(json_format.ParseDict(request_fields, planner_pb2.WhatIfRequest()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_what_if_through_grpcurl_and_reflection(planner):
    described = _grpcurl(planner.port, "describe", "pqmesh.planner.v1.PlannerService")
    assert "rpc WhatIf ( .pqmesh.planner.v1.WhatIfRequest ) returns ( .pqmesh.planner.v1.WhatIfResponse )" in described
    assert "frontier_points" in _grpcurl(planner.port, "describe", "pqmesh.planner.v1.WhatIfRequest")
    base = {**BASE, "theta": 0.01}  # no quality bound: the largest batch is memory's (quick)
    out = _grpcurl(planner.port, "-d", json.dumps({"base": base, "time_limit_seconds": 60}),
                   "pqmesh.planner.v1.PlannerService/WhatIf")
    reply = json_format.Parse(out, planner_pb2.WhatIfResponse())  # grpcurl prints camelCase proto3 JSON
    _check_answers(json_format.MessageToDict(reply, preserving_proto_field_name=True))


def test_cli_what_if_json(tmp_path, capsys):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(CLUSTER)
    assert main(["plan", "--cluster", str(cluster), "--model", "opt-13b", "--batch", "8", "--prompt-len", "64",
                 "--gen-len", "16", "--what-if", "--json", "--time-limit", "60", "--add-type", "A100-40G",
                 "--theta", "0.01"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"base", "devices", "frontier", "max_batch", "solve_seconds", "time_limit_s", "cut_short"}
    assert report["time_limit_s"] == 60 and report["cut_short"] == 0  # a small pool: every answer in time
    assert not any(d["cut_short"] for d in report["devices"] + report["frontier"] + [report["max_batch"]])
    extra = [d for d in report["devices"] if d["device_type"] == "a100-40g"]
    assert len(extra) == 1 and extra[0]["host"] == "what-if-host" and extra[0]["feasible"]
    report["devices"] = [d for d in report["devices"] if d["device_type"] != "a100-40g"]
    _check_answers(report)
    for answer in [*report["devices"], *report["frontier"], report["max_batch"]]:
        if answer["feasible"]:
            assert answer["throughput_tokens_per_s"] == answer["plan"]["predicted"]["throughput_tokens_per_s"]


# The 16-device pool of docs/BENCHMARKS.md ("What-if on a large pool"), whose 60 s what-if took 114 s.
POOL_16 = Cluster(tuple(ClusterEntry(t, n, name=f"{t.lower()}-h0", host=f"{t.lower()}-h0") for t, n in
                        [("T4", 2), ("V100-32G", 1), ("A10G", 4), ("A100-40G", 6), ("A100-80G", 3)]))


def test_what_if_on_a_large_pool_keeps_its_time_limit_and_says_what_it_cut():
    limit = 5.0
    started = time.monotonic()
    result = what_if(PlanInputs("opt-175b", POOL_16, Workload(64, 512, 100)), time_limit=limit)
    wall = time.monotonic() - started
    assert wall <= limit * 1.1 and result.solve_seconds <= limit * 1.1, wall  # before: 85 s for a 10 s limit
    answers = [*result.devices, *result.frontier, result.max_batch]
    cut = [a for a in answers if a.note]
    assert result.cut_short == len(cut) > 0  # 17 plans do not fit in 5 s: some answers are cut, and say so
    for a in cut:
        if a.result is None:  # skipped: says what to change
            assert "raise the time limit" in a.note or "stopped at the what-if's time limit" in a.note, a
    assert any(d.result is not None for d in result.devices)  # the time went to answers, not only to the base
    report = result.to_report()
    assert report["cut_short"] == len(cut) and report["time_limit_s"] == limit
    flagged = [a for a in report["devices"] + report["frontier"] + [report["max_batch"]] if a["cut_short"]]
    assert len(flagged) == len(cut) and all(a["note"] for a in flagged)
    wire = result.to_proto()  # on the wire each answer carries its note
    assert [d.note for d in wire.devices] == [a.note for a in result.devices]
    assert [f.note for f in wire.frontier] == [a.note for a in result.frontier]
    assert wire.max_batch.note == result.max_batch.note
    assert result.max_batch.batch_size <= result.max_batch.batch_size_bound
