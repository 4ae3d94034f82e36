"""Planning from the job's length distributions: `pqmesh.lengths.LengthHistogram`, a `Workload` of
histograms (KV cache for the longest, costs at the padded mean, the replay over the distribution),
the per-sequence max_new_tokens of the replay, over gRPC and from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from planner.cluster import Cluster, ClusterEntry, Network, Workload
from planner.main import PlannerConfig, start
from planner.memory import stage_memory
from planner.mesh_costs import job_seconds, mesh_cost
from planner.request import PlanInputs
from planner.search import plan
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.errors import InvalidArgument
from pqmesh.grpc_server import channel
from pqmesh.length_groups import padded_tokens
from pqmesh.lengths import LengthHistogram, job_lengths
from pqmesh.mesh_cost import MeshCost, PhaseCost, StageCost
from pqmesh.mesh_sim import simulate
from pqmesh.types import Bits

PROMPTS = LengthHistogram.parse("64:600,256:300,1024:100")
GENERATIONS = LengthHistogram.parse("16:400,64:400,256:200")
CLUSTER = Cluster((ClusterEntry("T4", 3), ClusterEntry("V100-32G", 1)), Network())


def test_histogram_parses_merges_and_refuses_with_the_fix():
    assert LengthHistogram.parse("256:3, 64:2,64:1,128") == LengthHistogram(((64, 3), (128, 1), (256, 3)))
    assert str(PROMPTS) == "64:600,256:300,1024:100" and PROMPTS.total == 1000 and PROMPTS.longest == 1024
    assert PROMPTS.mean == pytest.approx((64 * 600 + 256 * 300 + 1024 * 100) / 1000)
    assert (PROMPTS.quantile(0.6), PROMPTS.quantile(0.61), PROMPTS.quantile(0.9), PROMPTS.quantile(1)) == \
        (64, 256, 256, 1024)
    for bad, words in (("", "no LENGTH:COUNT"), ("a:3", "whole numbers"), ("0:4", ">= 1"), ("12:0", "at least one")):
        with pytest.raises(InvalidArgument, match=words):
            LengthHistogram.parse(bad, "--prompt-lengths")
    with pytest.raises(InvalidArgument, match="ascending"):
        LengthHistogram(((5, 1), (3, 1)))


def test_sample_keeps_proportions_mixes_the_order_and_repeats():
    sample = PROMPTS.sample(100)
    assert Counter(sample) == {64: 60, 256: 30, 1024: 10}
    assert sample == PROMPTS.sample(100) and sample != sorted(sample)
    assert Counter(PROMPTS.sample(7)) == {64: 4, 256: 2, 1024: 1}  # largest remainder: 4.2, 2.1, 0.7
    assert len(LengthHistogram.parse("9:1").sample(5)) == 5


def test_workload_of_histograms_sizes_kv_for_the_longest_and_costs_at_the_mean():
    w = Workload(0, prompts=PROMPTS, generations=GENERATIONS)
    assert (w.batch_size, w.prompt_length, w.generation_length) == (1000, 218, 84)  # means, rounded up
    assert (w.max_prompt_length, w.max_generation_length, w.max_context, w.job_sequences) == (1024, 256, 1280, 1000)
    assert Workload.from_proto(w.to_proto()) == w
    assert replace(w, batch_size=16).batch_size == 16
    with pytest.raises(InvalidArgument, match="set one"):
        Workload(8, 512, 0, prompts=PROMPTS)
    with pytest.raises(InvalidArgument, match="batch_size"):
        Workload(0, 64, 16)
    shape = PlanInputs("opt-13b", CLUSTER, Workload(8, 64, 16)).to_problem().shape
    hist, worst = Workload(16, prompts=PROMPTS, generations=GENERATIONS), Workload(16, 1024, 256)
    bits = [Bits.B4] * 10
    assert stage_memory(shape, hist, bits, True, True, 4, 8) == stage_memory(shape, worst, bits, True, True, 4, 8)


def test_prefill_length_is_the_padded_mean_under_length_grouping():
    fixed = PlanInputs("opt-13b", CLUSTER, Workload(16, 300, 16)).to_problem()
    assert fixed.prefill_length(1) == fixed.prefill_length(8) == 300
    problem = PlanInputs("opt-13b", CLUSTER, Workload(16, prompts=PROMPTS, generations=GENERATIONS)).to_problem()
    lengths = [problem.prefill_length(k) for k in (1, 2, 4, 8, 16)]
    assert lengths[0] == 218 and lengths == sorted(lengths) and lengths[-1] <= PROMPTS.longest
    sample = PROMPTS.sample(1000)
    fifo = padded_tokens([sample[i:i + 8] for i in range(0, 1000, 8)])[1] / 1000  # FIFO groups of 8 pad more
    assert lengths[3] < 0.8 * fifo


def _cost() -> MeshCost:
    stage = StageCost(PhaseCost(1e-3, 0, 1e-5, 0), PhaseCost(1e-3, 1e-4, 0, 0), 1e-5, 1e9)
    return MeshCost((stage, stage), 1024, 1e-4, 1e-5)


def test_replay_runs_each_sequence_to_its_own_max_new_tokens():
    prompts = [32] * 12
    own = simulate(_cost(), prompts, [4, 64] * 6, 4, 2, 4)
    assert sum(n for phase, n in own.trace if phase == "decode") == 6 * 3 + 6 * 63
    every = simulate(_cost(), prompts, 64, 4, 2, 4)
    assert own.job_s < every.job_s
    assert simulate(_cost(), prompts, [64] * 12, 4, 2, 4) == every
    with pytest.raises(InvalidArgument, match="one per prompt"):
        simulate(_cost(), prompts, [4, 64], 4, 2, 4)


def test_job_lengths_of_a_proto_workload():
    w = Workload(16, prompts=PROMPTS, generations=GENERATIONS).to_proto()
    prompts, new = job_lengths(w)
    assert len(prompts) == len(new) == 16 and set(prompts) <= {64, 256, 1024} and set(new) <= {16, 64, 256}
    assert job_lengths(planner_pb2.Workload(batch_size=3, prompt_length=9, generation_length=2)) == ([9] * 3, [2] * 3)


def test_plan_for_the_distribution_replays_the_whole_job():
    """The job (1,000 sequences on 16 KV slots) is replayed, not one batch: its time scales with the job,
    and the plan made for the distribution is not slower on it than the plan for the worst case."""
    hist = Workload(16, prompts=PROMPTS, generations=GENERATIONS)
    problem = PlanInputs("opt-13b", CLUSTER, hist).to_problem()
    ours = plan(problem, time_limit=20)
    worst = plan(PlanInputs("opt-13b", CLUSTER, Workload(16, 1024, 256)).to_problem(), time_limit=20)
    ours_s = job_seconds(problem, ours.plan, mesh_cost(problem, ours.plan))
    assert ours.predicted.job_s == pytest.approx(ours_s)
    assert ours_s <= job_seconds(problem, worst.plan, mesh_cost(problem, worst.plan)) * 1.001
    half = replace(problem, workload=Workload(16, prompts=LengthHistogram.of((n, c // 2) for n, c in PROMPTS.bins),
                                              generations=GENERATIONS))
    assert job_seconds(half, ours.plan, mesh_cost(half, ours.plan)) < 0.6 * ours_s


@pytest.fixture
def planner(tmp_path):
    server, port, _ = start(PlannerConfig("127.0.0.1:0", tmp_path / "state"))
    ch = channel(f"127.0.0.1:{port}")
    yield planner_pb2_grpc.PlannerServiceStub(ch)
    ch.close()
    server.stop(0).wait()


def test_plan_request_with_histograms_over_grpc(planner):
    workload = planner_pb2.Workload(batch_size=16)
    workload.prompt_lengths.extend(PROMPTS.to_proto())
    workload.generation_lengths.extend(GENERATIONS.to_proto())
    request = planner_pb2.PlanRequest(model_name="opt-13b", workload=workload, time_limit_seconds=10,
                                      devices=[planner_pb2.ClusterDevice(device_type="T4", count=3),
                                               planner_pb2.ClusterDevice(device_type="V100-32G", count=1)])
    reply = planner.Plan(request)
    assert reply.predicted.job_s > 0 and reply.plan.stages
    request.workload.prompt_length = 512  # both a single length and a histogram
    with pytest.raises(grpc.RpcError) as err:
        planner.Plan(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "set one" in err.value.details()


def test_cli_plans_from_histograms(tmp_path):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[device]]\ntype = "T4"\ncount = 3\n[[device]]\ntype = "V100-32G"\n')
    exe = Path(sys.executable).parent / "pqmesh"
    out = subprocess.run([exe, "plan", "--cluster", cluster, "--model", "opt-13b", "--batch", "16",
                          "--prompt-lengths", str(PROMPTS), "--gen-lengths", str(GENERATIONS), "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out)["plan"]["stages"]
    text = subprocess.run([exe, "plan", "--cluster", cluster, "--model", "opt-13b", "--batch", "16",
                           "--prompt-lengths", str(PROMPTS), "--gen-len", "32"],
                          capture_output=True, text=True, timeout=120, check=True).stdout
    assert "prompt mean 218 (longest 1024)" in text and "KV cache for 1056 tokens" in text
    bad = subprocess.run([exe, "plan", "--cluster", cluster, "--model", "opt-13b", "--prompt-len", "64",
                          "--gen-len", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--batch is required" in bad.stderr


def test_length_summaries_keep_the_distributions_kv_cache():
    from planner.refine import length_summaries

    w = Workload(16, prompts=PROMPTS, generations=GENERATIONS)
    assert length_summaries(w) == [Workload(16, 256, 256, kv_tokens=1280), Workload(16, 1024, 256, kv_tokens=1280)]
    assert length_summaries(Workload(16, 64, 8)) == []
    with pytest.raises(InvalidArgument, match="kv_tokens_per_sequence 100 is less"):
        Workload(16, 64, 64, kv_tokens=100)
