"""Several pipelines for one pool (planner.replicas): the pool is dealt evenly, hosts are kept, a
pool with more devices than layers plans as replicas, and the answer's throughput is the job's
over its slowest replica. Real solver runs on small models."""

from __future__ import annotations

import json

import grpc
import pytest

from planner.cluster import Cluster, ClusterEntry, Workload
from planner.replicas import batch_shares, candidates, plan_replicas, split_pool
from planner.request import PlanInputs
from pqmesh.errors import InvalidArgument

TINY = json.dumps({"model_type": "llama", "_name_or_path": "tiny-4", "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                   "max_position_embeddings": 128})


def test_split_pool_deals_devices_evenly_and_keeps_hosts():
    cluster = Cluster((ClusterEntry("T4", 5, host="a"), ClusterEntry("V100-32G", 2, host="b"), ClusterEntry("A10G")))
    pools = split_pool(cluster, 3)
    sizes = [sum(e.count for e in p.entries) for p in pools]
    assert sum(sizes) == 8 and max(sizes) - min(sizes) <= 1
    for t in ("T4", "V100-32G", "A10G"):
        per = [sum(e.count for e in p.entries if e.device_type == t) for p in pools]
        assert sum(per) == sum(e.count for e in cluster.entries if e.device_type == t) and max(per) - min(per) <= 1
    assert {e.host for p in pools for e in p.entries} == {"a", "b", "host2-a10g"}
    with pytest.raises(InvalidArgument):
        split_pool(cluster, 9)


def test_shares_and_candidates():
    assert batch_shares(10, 4) == [3, 3, 2, 2]
    assert candidates(256, 96, 256) == [3, 6, 12, 24]
    assert candidates(10, 40, 8) == [1, 2, 4, 8]
    assert candidates(10, 4, 2) == []  # 3 replicas at least, but only 2 sequences


def test_a_pool_larger_than_the_model_plans_as_replicas():
    cluster = Cluster((ClusterEntry("T4", 6, host="a"), ClusterEntry("V100-32G", 4, host="b")))
    inputs = PlanInputs(TINY, cluster, Workload(8, 32, 8))
    found = plan_replicas(inputs, time_limit=60)
    assert set(found.tried) == {3, 6}  # 10 devices over 4 layers: at least 3 pipelines
    best = found.best
    assert best.throughput_tokens_per_s == max(p.throughput_tokens_per_s for p in found.tried.values())
    assert sum(r.batch_size for r in best.replicas) == 8
    assert sum(len(r.result.plan.stages) for r in best.replicas) == 10  # every device in one pipeline
    slowest = max(r.result.predicted.prefill_s + r.result.predicted.decode_s for r in best.replicas)
    assert best.throughput_tokens_per_s == pytest.approx(8 * 8 / slowest)
    assert best.pipeedge_tokens_per_s and best.throughput_tokens_per_s >= best.pipeedge_tokens_per_s * (1 - 1e-9)
    assert 0.0 <= best.optimality_gap < 1.0


def test_no_replica_count_fits_the_batch():
    cluster = Cluster((ClusterEntry("T4", 10, host="a"),))
    with pytest.raises(InvalidArgument, match="every replica needs a sequence"):
        plan_replicas(PlanInputs(TINY, cluster, Workload(2, 32, 8)), time_limit=10)


def test_cli_replicas_json(tmp_path, capsys):
    from cli.main import main

    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[device]]\ntype = "T4"\ncount = 6\nhost = "a"\n[[device]]\ntype = "V100-32G"\ncount = 4\n')
    model = tmp_path / "config.json"
    model.write_text(TINY)
    assert main(["plan", "--cluster", str(cluster), "--model", str(model), "--batch", "8", "--prompt-len", "32",
                 "--gen-len", "8", "--replicas", "--json", "--time-limit", "60"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"replicas", "throughput_tokens_per_s", "pipeedge_tokens_per_s", "optimality_gap", "tried",
                           "solve_seconds"}
    assert set(report["tried"]) == {"3", "6"} and len(report["replicas"]) in (3, 6)
    assert sum(d["count"] for r in report["replicas"] for d in r["devices"]) == 10
    assert all(set(r["plan"]) >= {"plan", "predicted", "baselines", "optimality_gap"} for r in report["replicas"])


def test_plan_replicas_over_grpc_and_grpcurl(tmp_path):
    from google.protobuf import json_format
    from test_planner_service import Planner, _grpcurl

    from pqmesh.api.planner.v1 import planner_pb2

    base = {"model_config_json": TINY, "devices": [{"device_type": "T4", "count": 6, "host": "a"},
                                                   {"device_type": "V100-32G", "count": 4, "host": "b"}],
            "workload": {"batch_size": 8, "prompt_length": 32, "generation_length": 8}}
    planner = Planner(tmp_path / "state")
    try:
        reply = planner.stub.PlanReplicas(json_format.ParseDict({"base": base, "time_limit_seconds": 60},
                                                                planner_pb2.PlanReplicasRequest()))
        assert {t.replicas for t in reply.tried} == {3, 6} and all(t.feasible for t in reply.tried)
        assert len(reply.replicas) in (3, 6) and sum(r.batch_size for r in reply.replicas) == 8
        assert sum(d.count for r in reply.replicas for d in r.devices) == 10
        assert reply.throughput_tokens_per_s == max(t.throughput_tokens_per_s for t in reply.tried)
        described = _grpcurl(planner.port, "describe", "pqmesh.planner.v1.PlannerService")
        assert "rpc PlanReplicas ( .pqmesh.planner.v1.PlanReplicasRequest )" in described
        out = _grpcurl(planner.port, "-d", json.dumps({"base": base, "replica_counts": [3]}),
                       "pqmesh.planner.v1.PlannerService/PlanReplicas")
        again = json_format.Parse(out, planner_pb2.PlanReplicasResponse())
        assert len(again.replicas) == 3 and [t.replicas for t in again.tried] == [3]
        for bad in ({}, {"base": base, "replica_counts": [0]}, {"base": base, "time_limit_seconds": 1000}):
            with pytest.raises(grpc.RpcError) as err:
                planner.stub.PlanReplicas(json_format.ParseDict(bad, planner_pb2.PlanReplicasRequest()))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
    finally:
        planner.stop()
