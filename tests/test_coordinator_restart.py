"""`pqmesh-coordinator` as a real process, killed with SIGKILL in the middle of a job and started again
on the same state directory: the job completes with every result present exactly once, in submission
order, equal to Hugging Face generate, and no stored sequence is computed again."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from test_coordinator_e2e import Client, mixed_prompts, plan_for, start_stages, stop_stages
from tiny_models import build_checkpoint, reference_greedy

from pqmesh.api.coordinator.v1 import coordinator_pb2

REPO = Path(__file__).resolve().parents[1]


class CoordinatorProcess:
    """`python -m coordinator.main` with its JSON log lines (stderr is not a terminal) read on a thread."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "coordinator.main", *args], cwd=REPO,
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.events: list[dict] = []
        self._arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "text", "line": line}
            with self._arrived:
                self.events.append(event)
                self._arrived.notify_all()

    def wait_for(self, name: str, timeout: float = 60) -> dict:
        """The first log event called ``name``, waiting for it if it has not been written yet."""
        with self._arrived:
            found = self._arrived.wait_for(lambda: [e for e in self.events if e["event"] == name], timeout)
        assert found, f"no {name!r} in the coordinator's log: {self.events[-5:]}"
        return found[0]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def test_killed_coordinator_resumes_without_losing_or_repeating_results(tmp_path):
    root = tmp_path / "models"
    model = build_checkpoint("llama", root / "tiny-llama")
    stages = start_stages(root, 3)
    addresses = [address for _, address, _ in stages]
    plan = tmp_path / "plan.json"
    plan.write_text(plan_for(addresses, 2, 3).to_json())
    args = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"), "--plan", str(plan),
            "--model-id", "tiny-llama", "--max-sequences", "3", "--max-tokens-per-sequence", "48"]
    prompts = mixed_prompts(30, seed=11)
    count = len(prompts)
    try:
        first = CoordinatorProcess(args)
        client = Client(first.wait_for("coordinator_serving")["port"])
        job = client.submit(prompts, 24, key="nightly-batch")
        for progress in client.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=120):
            if progress.sequences_done >= 6:
                first.kill()  # mid-job: KV slots in use, micro-batches in flight
                break
        client.close()
        with sqlite3.connect(tmp_path / "state" / "coordinator.sqlite3") as db:
            stored = db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?", (job,)).fetchone()[0]
        assert 6 <= stored < count, "the job must be cut off in the middle"

        second = CoordinatorProcess(args)
        client = Client(second.wait_for("coordinator_serving")["port"])
        loaded = second.wait_for("job_loaded")
        assert (loaded["job_id"], loaded["pending"], loaded["resumed"]) == (job, count - stored, True)
        assert client.submit(prompts, 24, key="nightly-batch") == job  # the retried submit finds it
        final = client.wait(job, timeout=120)
        assert (final.state, final.sequences_done) == (coordinator_pb2.JOB_STATE_SUCCEEDED, count)
        results = client.results(job, page_size=7)
        assert [r.index for r in results] == list(range(count))
        assert [list(r.token_ids) for r in results] == reference_greedy(model, prompts, 24)
        client.close()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=30) == 0
        with sqlite3.connect(tmp_path / "state" / "coordinator.sqlite3") as db:
            rows = db.execute("SELECT idx, COUNT(*) FROM results WHERE job_id = ? GROUP BY idx", (job,)).fetchall()
        assert rows == [(i, 1) for i in range(count)]
    finally:
        for process in [p for p in (locals().get("first"), locals().get("second")) if p is not None]:
            process.proc.kill()
            process.proc.wait()
        stop_stages(stages)
