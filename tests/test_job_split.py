"""The job splitter's pure parts, without gRPC: dealing a file's lines into contiguous shards (even or
weighted), shard keys that change with the split, and the merged output mapping shard-local indices
to the file's and keeping each line's result once."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.job_split import MergedOutput, Shard, deal, parse_shares, shard_key, shares_from
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.errors import InvalidArgument


def test_deal_covers_every_line_once_in_contiguous_ranges():
    for total in (0, 1, 2, 7, 100, 101):
        for count in (1, 2, 3, 5):
            shards = deal(total, [f"h:{i}" for i in range(count)])
            assert [i for s in shards for i in s.part] == list(range(total))
            sizes = [len(s.part) for s in shards]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert [s.coordinator for s in shards] == [f"h:{i}" for i in range(count)]


def test_deal_by_shares_is_proportional_with_largest_remainders():
    shards = deal(10, ["a:1", "b:1"], (3.0, 1.0))
    assert [s.part for s in shards] == [range(0, 8), range(8, 10)]  # 7.5 / 2.5: the tie goes to the first
    shards = deal(100, ["a:1", "b:1", "c:1"], (212.4, 106.2, 53.1))
    assert [len(s.part) for s in shards] == [57, 29, 14]
    assert [i for s in shards for i in s.part] == list(range(100))


def test_deal_refuses_what_a_user_can_get_wrong():
    with pytest.raises(InvalidArgument, match="same address twice"):
        deal(5, ["a:1", "a:1"])
    with pytest.raises(InvalidArgument, match="--coordinator"):
        deal(5, [])
    with pytest.raises(InvalidArgument, match="one weight per coordinator"):
        parse_shares("1,2,3", 2)
    with pytest.raises(InvalidArgument, match="positive"):
        parse_shares("1,0", 2)
    with pytest.raises(InvalidArgument, match="comma-separated numbers"):
        parse_shares("fast,slow", 2)
    assert parse_shares("3, 1.5", 2) == (3.0, 1.5)


def test_shares_from_a_replicas_report(tmp_path):
    report = tmp_path / "replicas.json"
    report.write_text(json.dumps({"replicas": [{"plan": {"predicted": {"throughput_tokens_per_s": 40.0}}},
                                               {"plan": {"predicted": {"throughput_tokens_per_s": 10.0}}}]}))
    assert shares_from(str(report), 2) == (40.0, 10.0)
    with pytest.raises(InvalidArgument, match="one weight per coordinator"):
        shares_from(str(report), 3)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="pqmesh plan --replicas --json"):
        shares_from(str(tmp_path / "other.json"), 2)


def test_shard_keys_differ_by_shard_and_by_split():
    even, weighted = deal(10, ["a:1", "b:1"]), deal(10, ["a:1", "b:1"], (3.0, 1.0))
    keys = {shard_key("cli-abc", s, 2) for s in even + weighted}
    assert len(keys) == 4 and all(k.startswith("cli-abc-s") for k in keys)
    assert shard_key("cli-abc", even[0], 2) == shard_key("cli-abc", Shard(0, "other:9", range(0, 5)), 2)


def result(index: int, custom_id: str = "") -> coordinator_pb2.SequenceResult:
    return coordinator_pb2.SequenceResult(index=index, custom_id=custom_id, token_ids=[index], text=f"t{index}",
                                          finish_reason=coordinator_pb2.FINISH_REASON_LENGTH)


def test_merged_output_maps_indices_and_keeps_each_line_once():
    sink = io.StringIO()
    shards = deal(5, ["a:1", "b:1"])  # 0-2 and 3-4
    merged = MergedOutput(sink, 5, openai=False)
    assert merged.add(shards[1], "job-b", result(0, "x"))
    assert merged.add(shards[0], "job-a", result(2))
    assert not merged.add(shards[1], "job-b", result(0, "x"))  # the same line again
    for local in (0, 1):
        assert merged.add(shards[0], "job-a", result(local))
    assert merged.add(shards[1], "job-b", result(1))
    rows = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [r["index"] for r in rows] == [3, 2, 0, 1, 4]
    assert rows[0]["custom_id"] == "x" and merged.duplicates == 1 and merged.missing() == 0
    assert (merged.written, merged.total) == (5, 5)


def test_merged_output_refuses_an_index_outside_the_shard():
    merged = MergedOutput(io.StringIO(), 4, openai=False)
    with pytest.raises(Exception, match="line 2 of a shard of 2 lines"):
        merged.add(deal(4, ["a:1", "b:1"])[0], "job-a", result(2))


def test_shares_from_a_real_replicas_plan(tmp_path):
    """`pqmesh plan --replicas --json`'s object, from the planner itself: its replicas' throughputs."""
    from test_planner_replicas import TINY

    from planner.cluster import Cluster, ClusterEntry, Workload
    from planner.replicas import plan_replicas
    from planner.request import PlanInputs

    cluster = Cluster((ClusterEntry("T4", 4, host="a"), ClusterEntry("V100-32G", 1, host="b")))
    report = plan_replicas(PlanInputs(TINY, cluster, Workload(4, 32, 8)), time_limit=30).to_report()
    path = tmp_path / "replicas.json"
    path.write_text(json.dumps(report))
    count = len(report["replicas"])
    shares = shares_from(str(path), count)
    assert count >= 2 and shares == tuple(r["plan"]["predicted"]["throughput_tokens_per_s"] for r in report["replicas"])
    assert sum(len(s.part) for s in deal(100, [f"h:{i}" for i in range(count)], shares)) == 100

    # each replica's coordinator runs its own pipeline from the same file (--plan replicas.json --replica N)
    from coordinator.config import CoordinatorConfig
    from pqmesh.errors import InvalidArgument
    from pqmesh.plan import PipelinePlan

    for i, replica in enumerate(report["replicas"]):
        own = PipelinePlan.from_json(json.dumps(replica["plan"]))
        assert PipelinePlan.from_file(path, i).to_json() == own.to_json()
    with pytest.raises(InvalidArgument, match=f"pick this coordinator's with --replica 0..{count - 1}"):
        PipelinePlan.from_file(path)
    with pytest.raises(InvalidArgument, match="--replica 0..") :
        PipelinePlan.from_file(path, count)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(report["replicas"][0]["plan"]))
    with pytest.raises(InvalidArgument, match="leave --replica out"):
        PipelinePlan.from_file(single, 0)
    stages = len(report["replicas"][1]["plan"]["plan"]["stages"])
    config = CoordinatorConfig.from_args(["--plan", str(path), "--replica", "1", "--state-dir", str(tmp_path / "s"),
                                          "--model-id", "tiny"] + [a for k in range(stages)
                                                                    for a in ("--stage", f"127.0.0.1:{6000 + k}")])
    assert config.plan.plan_id == PipelinePlan.from_file(path, 1).plan_id


def test_submit_refuses_a_bad_split_before_sending_anything(tmp_path, capsys, monkeypatch):
    from cli.main import main as cli

    monkeypatch.setattr("cli.main.configure", lambda *args, **kwargs: None)
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    nowhere = "127.0.0.1:9"  # nothing is contacted: each refusal comes first
    cases = [(["--coordinator", nowhere, "--shares", "1"], "give --coordinator more than once"),
             (["--coordinator", nowhere, "--coordinator", nowhere], "same address twice"),
             (["--coordinator", nowhere, "--coordinator", "127.0.0.1:10", "--shares", "1,2,3"],
              "3 weight(s) for 2 --coordinator")]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert cli(["submit", str(tmp_path / "empty.jsonl"), "--coordinator", nowhere, "--coordinator", "h:1"]) == 2
    assert "has no non-blank lines" in capsys.readouterr().err
    for flags, message in cases:
        assert cli(["submit", str(source), *flags]) == 2
        assert message in capsys.readouterr().err


CTRL_C_SCRIPT = """
import sys, threading
from coordinator.job_split import Shard, ShardOutcome, _in_threads
started, never = threading.Semaphore(0), threading.Event()
def work(o):
    started.release()
    never.wait()
def report():
    for _ in range(2):
        started.acquire()
    print("following", flush=True)
threading.Thread(target=report, daemon=True).start()
try:
    _in_threads(work, [ShardOutcome(Shard(i, f"h:{i}", range(1))) for i in range(2)])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_ends_the_shard_threads_wait():
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline() == "following\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait()
