"""One jsonl job across 2 pipelines: two coordinators on loopback, each driving its own stage process
(a tiny random Llama with the SmolLM2 tokenizer). `pqmesh submit --coordinator A --coordinator B`
writes the same results as the file run on one mesh, every line's result exactly once with its index
or custom_id; a re-run finds the same jobs (none is created twice); a coordinator that stays
unreachable fails its shard with its address named while the other shard's results stay in the output;
a coordinator restarted while its shard's results stream is followed again, each line still once."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from batch_helpers import build_chat_checkpoint, chat_line, completion_line, free_port
from test_coordinator_e2e import plan_for

from cli.main import main as cli
from coordinator.config import CoordinatorConfig
from coordinator.job_split import failure_message, run_split, split_job
from coordinator.main import serve
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.grpc_server import channel

MODEL = "tiny-chat"
STAGE = str(Path(sys.executable).with_name("pqmesh-stage"))


def start_stage_process(model_root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    log_file = log.open("w")
    proc = subprocess.Popen([STAGE, "--listen", "127.0.0.1:0", "--model-root", str(model_root),
                             "--memory-budget", "1GiB"], stderr=log_file, stdout=subprocess.DEVNULL)
    log_file.close()
    return proc, str(log)


def wait_serving(proc: subprocess.Popen, log: str, limit_s: float = 120) -> str:
    """The stage's address, from its `stage_serving` log line (JSON: stderr is not a terminal)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-2000:]
        for line in Path(log).read_text().splitlines():
            if '"stage_serving"' in line:
                return f"127.0.0.1:{json.loads(line)['port']}"
        time.sleep(0.2)
    raise AssertionError(f"the stage process did not start serving: {Path(log).read_text()[-2000:]}")


class Meshes:
    """The two coordinators (in this process, on loopback) of the two meshes; one can be stopped and
    served again on the same port and state directory (a coordinator restart)."""

    def __init__(self) -> None:
        self.configs: list[CoordinatorConfig] = []
        self.running: list = []

    def start(self, config: CoordinatorConfig):
        running = serve(config)
        self.configs.append(replace(config, listen=f"127.0.0.1:{running.port}"))
        self.running.append(running)
        return running

    def stop_one(self, i: int) -> None:
        self.running[i].stop(grace=None)

    def serve_again(self, i: int) -> None:
        self.running[i] = serve(self.configs[i])

    def stop(self) -> None:
        for running in self.running:
            running.stop(grace=None)


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_chat_checkpoint(root / MODEL)
    logs = tmp_path_factory.mktemp("logs")
    procs = [start_stage_process(root, logs / f"stage-{i}.log") for i in range(2)]
    found = Meshes()

    def coordinator(i: int, proc: subprocess.Popen, log: str):
        return CoordinatorConfig("127.0.0.1:0", tmp_path_factory.mktemp(f"state-{i}"),
                                 plan_for([wait_serving(proc, log)], 4, 4, [(0, 2)]), MODEL, max_sequences=6,
                                 max_tokens_per_sequence=96, model_root=root, log_level="warning", dtype="float32")

    try:
        with ThreadPoolExecutor(2) as pool:  # both stage processes start at once
            configs = list(pool.map(coordinator, range(2), *zip(*procs)))
        for config in configs:
            found.start(config)
        yield found
    finally:
        found.stop()
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def pipelines(meshes):
    """The two coordinators' addresses."""
    return [f"127.0.0.1:{r.port}" for r in meshes.running]


@pytest.fixture(autouse=True)
def _quiet_cli(monkeypatch):
    monkeypatch.setattr("cli.main.configure", lambda *args, **kwargs: None)


def job_file(tmp_path: Path) -> Path:
    lines = [chat_line(f"chat-{i}", f"Say something about {i}.", max_tokens=4) for i in range(6)]
    lines += [completion_line(f"text-{i}", f"Once upon a time {i}", max_tokens=3) for i in range(4)]
    lines.insert(5, '{"custom_id": "broken", ')  # an error line, in the first shard
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n\n")  # a blank line is no line
    return source


def comparable(rows: list[dict]) -> dict:
    """custom_id -> the parts of a result that do not name the job."""
    out = {}
    for row in rows:
        response = row["response"]
        body = {k: v for k, v in response["body"].items() if k not in ("id", "created")} if response else None
        assert row["custom_id"] not in out, f"{row['custom_id']} twice"
        out[row["custom_id"]] = (response and response["status_code"], body, row["error"])
    return out


def list_jobs(address: str) -> list:
    with channel(address) as ch:
        return list(coordinator_pb2_grpc.CoordinatorServiceStub(ch).ListJobs(coordinator_pb2.ListJobsRequest()).jobs)


def test_two_pipelines_give_one_meshs_results_each_line_once_and_rerun_makes_no_new_job(pipelines, tmp_path, capsys):
    a, b = pipelines
    source, single, split, again = (job_file(tmp_path), tmp_path / "single.jsonl", tmp_path / "split.jsonl",
                                    tmp_path / "again.jsonl")
    assert cli(["submit", str(source), "--coordinator", a, "--out", str(single), "--max-new-tokens", "4"]) == 0
    flags = ["--coordinator", a, "--coordinator", b, "--max-new-tokens", "4"]
    assert cli(["submit", str(source), *flags, "--out", str(split)]) == 0
    one = [json.loads(line) for line in single.read_text().splitlines()]
    two = [json.loads(line) for line in split.read_text().splitlines()]
    assert len(one) == len(two) == 11
    assert comparable(two) == comparable(one)
    assert {r["custom_id"] for r in two} == {f"chat-{i}" for i in range(6)} | {f"text-{i}" for i in range(4)} | {None}
    # each shard ran on its own coordinator: ids name the job that made them, with the line's index in the file
    jobs_a, jobs_b = list_jobs(a), list_jobs(b)
    assert len(jobs_a) == 2 and len(jobs_b) == 1  # the single-mesh run + shard 0 on a, shard 1 on b
    index_of = {r["custom_id"]: int(r["id"].rsplit("-", 1)[1]) for r in two}
    expected_order = [f"chat-{i}" for i in range(5)] + [None, "chat-5"] + [f"text-{i}" for i in range(4)]
    assert [index_of[c] for c in expected_order] == list(range(11))
    assert all(r["id"].startswith(f"batch_req_{jobs_b[0].job_id}-") == (index_of[r["custom_id"]] >= 6) for r in two)

    assert cli(["submit", str(source), *flags, "--out", str(again)]) == 0  # a re-run: the same jobs, no new one
    assert [j.job_id for j in list_jobs(a)] == [j.job_id for j in jobs_a]
    assert [j.job_id for j in list_jobs(b)] == [j.job_id for j in jobs_b]
    capsys.readouterr()
    assert cli(["submit", str(source), *flags, "--no-wait"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith((a + " ", b + " "))]
    assert printed == [f"{a} {jobs_a[0].job_id}", f"{b} {jobs_b[0].job_id}"]  # ListJobs: newest first
    rerun = [json.loads(line) for line in again.read_text().splitlines()]
    assert comparable(rerun) == comparable(two) and sorted(r["id"] for r in rerun) == sorted(r["id"] for r in two)

    # `pqmesh run-batch` with the same coordinators and settings: the same shards, so the same jobs
    by_run_batch = tmp_path / "run-batch.jsonl"
    assert cli(["run-batch", "-i", str(source), "-o", str(by_run_batch), *flags]) == 0
    assert comparable([json.loads(line) for line in by_run_batch.read_text().splitlines()]) == comparable(two)
    assert len(list_jobs(a)) == 2 and len(list_jobs(b)) == 1


def test_weighted_shares_and_plain_lines_keep_their_global_index(pipelines, tmp_path):
    a, b = pipelines
    source, out = tmp_path / "plain.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(json.dumps({"token_ids": [5 + i, 6, 7], **({"custom_id": "mine"} if i == 7 else {})})
                                for i in range(8)) + "\n")
    assert cli(["submit", str(source), "--coordinator", a, "--coordinator", b, "--shares", "1,3",
                "--max-new-tokens", "2", "--ignore-eos", "--out", str(out)]) == 0
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(8)) and rows[7]["custom_id"] == "mine"
    assert all(len(r["token_ids"]) == 2 for r in rows)
    shard_b = [j for j in list_jobs(b) if j.sequences_total == 6]
    assert len(shard_b) == 1  # 1:3 of 8 lines: 2 on a, 6 on b


def test_an_unreachable_coordinator_fails_its_shard_naming_it_and_keeps_the_others_results(pipelines, tmp_path):
    a, _ = pipelines
    dead = f"127.0.0.1:{free_port()}"
    source = job_file(tmp_path)
    params = coordinator_pb2.GenerationParams(max_new_tokens=4, stop_on_eos=True)
    job = split_job(source, params, [a, dead])
    sink = io.StringIO()
    channels = []

    def connect(address: str):
        channels.append(channel(address))
        return coordinator_pb2_grpc.CoordinatorServiceStub(channels[-1])

    outcomes, merged = run_split(connect, job, sink, stream=io.StringIO(), reconnect_s=2)
    for ch in channels:
        ch.close()
    ok, failed = outcomes
    assert not ok.error and ok.results == 6 and failed.error and "unreachable for 2 s" in failed.error
    message = failure_message(outcomes, merged, "out.jsonl")
    assert f"shard 1 (lines 6-10) on {dead}" in message and "6 of 11 results are in out.jsonl" in message
    assert "job (not created)" in message and "run the same command again" in message
    rows = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert sorted(int(r["id"].rsplit("-", 1)[1]) for r in rows) == list(range(6))


class RestartOnFirstResult(io.StringIO):
    """The output. The first result the shard-1 thread writes stops shard 1's coordinator before the
    write returns (the rest of that job is still generating, so its result stream breaks there) and
    serves it again on another thread."""

    def __init__(self, meshes: Meshes) -> None:
        super().__init__()
        self.meshes, self.restarted = meshes, threading.Event()

    def write(self, text: str) -> int:
        if threading.current_thread().name == "shard-1" and not self.restarted.is_set():
            self.restarted.set()
            self.meshes.stop_one(1)
            threading.Thread(target=self.meshes.serve_again, args=(1,), daemon=True).start()
        return super().write(text)


def test_a_coordinator_restarted_midway_resumes_its_shard_each_line_once(meshes, pipelines, tmp_path):
    source = tmp_path / "plain.jsonl"
    lengths = [3] * 6 + [1] + [24] * 5  # shard 1 (lines 6-11): one short request finishes first
    source.write_text("\n".join(json.dumps({"token_ids": [20 + i, 6, 7], "max_tokens": n})
                                for i, n in enumerate(lengths)) + "\n")
    params = coordinator_pb2.GenerationParams(max_new_tokens=3, stop_on_eos=False)
    sink, progress = RestartOnFirstResult(meshes), io.StringIO()
    channels = []

    def connect(address: str):
        channels.append(channel(address))
        return coordinator_pb2_grpc.CoordinatorServiceStub(channels[-1])

    outcomes, merged = run_split(connect, split_job(source, params, pipelines), sink, stream=progress,
                                 reconnect_s=60)
    for ch in channels:
        ch.close()
    assert sink.restarted.is_set() and "reconnecting" in progress.getvalue()
    assert [o.error for o in outcomes] == ["", ""]
    rows = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(12)) and merged.duplicates == 0
    assert [len(r["token_ids"]) for r in sorted(rows, key=lambda r: r["index"])] == lengths
    assert all(o.final.state == coordinator_pb2.JOB_STATE_SUCCEEDED for o in outcomes)
