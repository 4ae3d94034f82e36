"""Stage failures with real `pqmesh-stage` processes and a real SIGKILL (docs/RELIABILITY.md, "Stage failure").

(a) The middle stage of three is killed in the middle of a greedy job and started again on the same
    port: the coordinator pauses, brings the mesh back (the new process loads its shard, the others
    free their stale KV), re-prefills every unfinished sequence from prompt + generated tokens and
    finishes the job with outputs identical to Hugging Face generate, every result exactly once.
(b) The middle stage is killed and not started again: the job fails within --stage-recovery-timeout
    naming the stage, finished results stay readable, the coordinator keeps answering and refuses new
    jobs with UNAVAILABLE until the stage is back (here: a stage server in the test process on the
    same port), then runs them again.
(c) The middle stage is frozen (SIGSTOP): the missing reply trips --step-timeout, the coordinator
    reconnects until the stage answers again (SIGCONT) and the job finishes identical.
"""

from __future__ import annotations

import itertools
import signal
import sqlite3
import sys
import time
from pathlib import Path

import grpc
import pytest
from test_coordinator_e2e import Client, mixed_prompts, start_coordinator
from tiny_models import build_checkpoint, reference_greedy

from localmesh.processes import Child
from pqmesh.api.coordinator.v1 import coordinator_pb2
from stage_server.config import StageConfig
from stage_server.main import serve as serve_stage

STAGE = str(Path(sys.executable).parent / "pqmesh-stage")
MAX_NEW = 24


class StageProcess:
    """One `pqmesh-stage` process on 127.0.0.1 (port 0: a free one); its JSON log goes next to the models."""

    _numbers = itertools.count()

    def __init__(self, model_root: Path, port: int = 0) -> None:
        self.proc = Child("stage", [STAGE, "--listen", f"127.0.0.1:{port}", "--model-root", str(model_root),
                                    "--memory-budget", "1GiB"],
                          model_root.parent / f"stage-{next(self._numbers)}.log",
                          env={"OMP_NUM_THREADS": "1"})  # 3 processes share 2 cores

    def address(self, timeout: float = 60) -> str:
        self.proc.wait_ready("stage_serving", timeout)
        return self.proc.address

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture
def checkpoint(tmp_path):
    root = tmp_path / "models"
    return root, build_checkpoint("llama", root / "tiny-llama")


def start_mesh(root: Path) -> tuple[list[StageProcess], list[str]]:
    stages = [StageProcess(root) for _ in range(3)]
    return stages, [s.address() for s in stages]


def kill_mid_job(client: Client, job: str, stage: StageProcess, after_tokens: int) -> coordinator_pb2.JobProgress:
    """SIGKILLs ``stage`` once the job has produced ``after_tokens`` tokens; returns the progress then."""
    for progress in client.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=60):
        if progress.tokens_generated >= after_tokens:
            stage.kill()
            return progress
    raise AssertionError(f"the job ended before {after_tokens} tokens: {progress}")


def undisturbed_run(client: Client, model, prompts) -> list[list[int]]:
    """The job's outputs on the same mesh without a failure; its first prompts checked against Hugging Face
    generate (all of them would cost ~20 s of first-call overhead in a fresh process)."""
    outputs = [list(r.token_ids) for r in client.run(prompts, MAX_NEW, key="undisturbed")]
    assert outputs[:2] == reference_greedy(model, prompts[:2], MAX_NEW)
    return outputs


def stored_counts(state_dir: Path, job: str) -> list[tuple[int, int]]:
    with sqlite3.connect(state_dir / "coordinator.sqlite3") as db:
        return db.execute("SELECT idx, COUNT(*) FROM results WHERE job_id = ? GROUP BY idx ORDER BY idx",
                          (job,)).fetchall()


def test_killed_middle_stage_restarted_on_its_port_job_finishes_identical(tmp_path, checkpoint):
    root, model = checkpoint
    stages, addresses = start_mesh(root)
    prompts = mixed_prompts(16, seed=21)
    coordinator = start_coordinator(tmp_path / "state", addresses, "tiny-llama", prefill=2, decode=3, max_sequences=4,
                                    max_tokens=48, stage_recovery_timeout=40.0, health_interval=0.5)
    client = Client(coordinator.port)
    try:
        reference = undisturbed_run(client, model, prompts)
        job = client.submit(prompts, MAX_NEW, key="nightly")
        # 4 KV slots: the first 4 sequences are done by then and the next ones are half-way
        at_kill = kill_mid_job(client, job, stages[1], after_tokens=4 * MAX_NEW + 4 * MAX_NEW // 2)
        assert at_kill.sequences_done < len(prompts), "the job must be cut off in the middle"
        killed_at = time.monotonic()
        # the job pauses: some update says so (a loaded CI host may take more than a second to notice)
        paused = client.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=20)
        assert any("reconnecting" in update.message for update in paused)
        paused.cancel()
        stages[1] = StageProcess(root, int(addresses[1].rpartition(":")[2]))  # systemd's restart, same port
        assert stages[1].address() == addresses[1]
        final = client.wait(job, timeout=60)
        recovered_in = time.monotonic() - killed_at
        assert (final.state, final.sequences_done) == (coordinator_pb2.JOB_STATE_SUCCEEDED, len(prompts)), final
        results = client.results(job)
        assert [r.index for r in results] == list(range(len(prompts)))
        assert [list(r.token_ids) for r in results] == reference  # identical to the undisturbed run
        assert stored_counts(tmp_path / "state", job) == [(i, 1) for i in range(len(prompts))]
        (outage,) = coordinator.engine.recoveries
        assert "Forward stream failed: UNAVAILABLE" in outage.reason and outage.in_flight
        assert outage.resumed > 0 and outage.resumed_tokens > 0  # re-prefilled from prompt + generated tokens
        assert client.submit(prompts, MAX_NEW, key="nightly") == job
        print(
            f"\nkilled after {at_kill.tokens_generated} tokens ({at_kill.sequences_done} sequences done); "
            f"paused {outage.seconds:.1f} s, {outage.attempts} bring-up attempts, {outage.resumed} sequences "
            f"re-prefilled with {outage.resumed_tokens} generated tokens; job done {recovered_in:.1f} s after the kill"
        )
    finally:
        client.close()
        coordinator.stop(grace=None)
        for stage in stages:
            stage.stop()


def test_stage_that_never_returns_fails_the_job_cleanly_and_the_coordinator_keeps_serving(tmp_path, checkpoint):
    root, model = checkpoint
    stages, addresses = start_mesh(root)
    prompts = mixed_prompts(16, seed=22)
    timeout = 4.0
    coordinator = start_coordinator(tmp_path / "state", addresses, "tiny-llama", prefill=2, decode=3, max_sequences=4,
                                    max_tokens=48, stage_recovery_timeout=timeout, health_interval=0.5)
    client = Client(coordinator.port)
    try:
        reference = undisturbed_run(client, model, prompts)
        job = client.submit(prompts, MAX_NEW)
        kill_mid_job(client, job, stages[1], after_tokens=4 * MAX_NEW + 8)
        killed_at = time.monotonic()
        final = client.wait(job, timeout=30)
        failed_after = time.monotonic() - killed_at
        assert final.state == coordinator_pb2.JOB_STATE_FAILED
        assert failed_after < timeout + 3.0
        assert f"stage 1 ({addresses[1]}, layers [1, 3)) unreachable for" in final.message
        assert f"of {len(prompts)} results finished and kept" in final.message
        assert 4 <= final.sequences_done < len(prompts)
        # finished results stay retrievable, each equal to the undisturbed run, each once
        results = client.results(job)
        assert len(results) == final.sequences_done
        assert all(list(r.token_ids) == reference[r.index] for r in results)
        assert stored_counts(tmp_path / "state", job) == [(r.index, 1) for r in results]
        # the coordinator still answers; new jobs are refused with a clear status until the mesh is back
        assert [j.state for j in client.stub.ListJobs(coordinator_pb2.ListJobsRequest()).jobs] == \
            [coordinator_pb2.JOB_STATE_FAILED, coordinator_pb2.JOB_STATE_SUCCEEDED]
        with pytest.raises(grpc.RpcError) as refused:
            client.submit(prompts[:2], 4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the mesh is down" in refused.value.details() and addresses[1] in refused.value.details()
        # the stage comes back (in this process: a second stage process start would cost ~15 s on 2 cores)
        back = serve_stage(StageConfig(addresses[1], "cpu", 1 << 30, root, 4, "warning"))
        deadline = time.monotonic() + 30
        while True:  # the coordinator keeps probing (every backoff maximum) and takes jobs again
            try:
                again = client.submit(prompts[:3], 6)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, err
                time.sleep(0.5)
        assert client.wait(again, timeout=30).state == coordinator_pb2.JOB_STATE_SUCCEEDED
        assert [list(r.token_ids) for r in client.results(again)] == [row[:6] for row in reference[:3]]
        back[0].stop(None)
        back[2].worker.stop()
        print(f"\njob failed {failed_after:.1f} s after the kill (--stage-recovery-timeout {timeout:g}) with "
              f"{final.sequences_done}/{len(prompts)} results kept: {final.message}")
    finally:
        client.close()
        coordinator.stop(grace=None)
        for stage in stages:
            stage.stop()


def test_hung_stage_is_detected_by_the_step_deadline_and_the_job_resumes_when_it_wakes(tmp_path, checkpoint):
    root, model = checkpoint
    stages, addresses = start_mesh(root)
    prompts = mixed_prompts(16, seed=23)
    coordinator = start_coordinator(tmp_path / "state", addresses, "tiny-llama", prefill=2, decode=3, max_sequences=4,
                                    max_tokens=48, step_timeout=3.0, stage_recovery_timeout=40.0, health_interval=0)
    client = Client(coordinator.port)
    try:
        reference = undisturbed_run(client, model, prompts)
        job = client.submit(prompts, MAX_NEW)
        for progress in client.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=60):
            if progress.tokens_generated >= 4 * MAX_NEW + 8:
                stages[1].proc.send_signal(signal.SIGSTOP)  # alive, connections open, never answers
                break
        stopped_at = time.monotonic()
        for progress in client.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=30):
            if "reconnecting" in progress.message:
                break
        detected_in = time.monotonic() - stopped_at
        time.sleep(1.0)
        stages[1].proc.send_signal(signal.SIGCONT)
        final = client.wait(job, timeout=60)
        assert (final.state, final.sequences_done) == (coordinator_pb2.JOB_STATE_SUCCEEDED, len(prompts)), final
        assert [list(r.token_ids) for r in client.results(job)] == reference
        assert stored_counts(tmp_path / "state", job) == [(i, 1) for i in range(len(prompts))]
        hung = [o for o in coordinator.engine.recoveries if "got no reply within 3 s (--step-timeout)" in o.reason]
        assert hung and hung[-1].resumed_tokens > 0
        print(f"\nhung stage detected {detected_in:.1f} s after SIGSTOP (--step-timeout 3); "
              f"resumed after {hung[-1].seconds:.1f} s with {hung[-1].resumed} sequences re-prefilled")
    finally:
        if stages[1].proc.poll() is None:
            stages[1].proc.send_signal(signal.SIGCONT)
        client.close()
        coordinator.stop(grace=None)
        for stage in stages:
            stage.stop()
