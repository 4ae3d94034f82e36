"""Live progress of the jobs the engine runs: sequences done, tokens, rate, phase and ETA.

The engine thread writes; WatchJob handlers read snapshots and wait for the next change. Finished
sequences are counted here only after the store has committed them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from coordinator.prediction import JobTiming
from coordinator.scheduler import Phase
from coordinator.store import JobRecord, JobState


@dataclass(frozen=True)
class Progress:
    job_id: str
    state: JobState
    sequences_total: int
    sequences_done: int
    tokens_generated: int
    tokens_per_second: float = 0.0
    phase: int = 0  # a Phase number, 0 when not running
    eta_seconds: float = 0.0
    message: str = ""
    predicted_seconds: float = 0.0  # the cost model's time for the job on this mesh; 0 = no prediction
    elapsed_seconds: float = 0.0  # since its first micro-batch; at the end, the measured time

    @classmethod
    def from_record(cls, record: JobRecord) -> "Progress":
        """For jobs the engine does not hold (finished before this coordinator started)."""
        rate = 0.0
        if record.started_at and record.finished_at and record.finished_at > record.started_at:
            rate = record.tokens_generated / (record.finished_at - record.started_at)
        return cls(record.id, record.state, record.num_prompts, record.num_results, record.tokens_generated, rate,
                   message=record.message)


@dataclass
class _Live:
    total: int
    done: int
    stored_tokens: int
    expected_tokens: int  # upper bound: every sequence runs to max_new_tokens
    state: JobState
    partial_tokens: int = 0
    phase: int = 0
    message: str = ""
    run_started: float | None = None
    tokens_at_start: int = 0
    final_rate: float = 0.0
    predicted_s: float = 0.0
    elapsed_s: float = 0.0  # set when the job ends

    @property
    def tokens(self) -> int:
        return self.stored_tokens + self.partial_tokens


class ProgressBoard:
    def __init__(self) -> None:
        self._jobs: dict[str, _Live] = {}
        self._changed = threading.Condition()
        self.version = 0
        self.last_timing: JobTiming | None = None  # the last job that succeeded with a prediction

    def _touch(self) -> None:
        self.version += 1
        self._changed.notify_all()

    def track(self, record: JobRecord, max_new_tokens: int) -> None:
        with self._changed:
            pending = record.num_prompts - record.num_results
            self._jobs[record.id] = _Live(record.num_prompts, record.num_results, record.tokens_generated,
                                          record.tokens_generated + pending * max_new_tokens, record.state)
            self._touch()

    def predicted(self, job_id: str, seconds: float) -> None:
        with self._changed:
            if job_id in self._jobs:
                self._jobs[job_id].predicted_s = seconds
                self._touch()

    def running(self, job_id: str, phase: Phase) -> bool:
        """A micro-batch of the job went out; True the first time (the job just left QUEUED)."""
        with self._changed:
            live = self._jobs[job_id]
            if live.run_started is None:
                live.run_started, live.tokens_at_start = time.monotonic(), live.tokens
            first = live.state is JobState.QUEUED
            if first:
                live.state = JobState.RUNNING
            if first or live.phase != int(phase):
                live.phase = int(phase)
                self._touch()
            return first

    def tokens(self, counts: dict[str, int]) -> None:
        """Sampled tokens of unfinished sequences (negative when a reset discards them)."""
        with self._changed:
            for job_id, count in counts.items():
                if job_id in self._jobs:
                    self._jobs[job_id].partial_tokens += count
            self._touch()

    def finished(self, job_id: str, sequences: int, tokens: int) -> None:
        """``sequences`` are stored; their ``tokens`` move from partial to stored."""
        with self._changed:
            live = self._jobs.get(job_id)
            if live is not None:
                live.done += sequences
                live.stored_tokens += tokens
                live.partial_tokens -= tokens
                self._touch()

    def final(self, job_id: str, state: JobState, message: str = "") -> None:
        with self._changed:
            live = self._jobs.get(job_id)
            if live is not None:
                live.final_rate = self._rate(live)
                live.elapsed_s = time.monotonic() - live.run_started if live.run_started is not None else 0.0
                live.state, live.message, live.phase, live.partial_tokens = state, message, 0, 0
                if state is JobState.SUCCEEDED and live.predicted_s > 0:
                    self.last_timing = JobTiming(job_id, live.predicted_s, live.elapsed_s).logged()
                self._touch()

    @staticmethod
    def _rate(live: _Live) -> float:
        if live.run_started is None:
            return 0.0
        elapsed = time.monotonic() - live.run_started
        return (live.tokens - live.tokens_at_start) / elapsed if elapsed > 0 else 0.0

    def note(self, job_id: str, message: str) -> None:
        with self._changed:
            if job_id in self._jobs:
                self._jobs[job_id].message = message
                self._touch()

    def snapshot(self, job_id: str) -> Progress | None:
        with self._changed:
            live = self._jobs.get(job_id)
            if live is None:
                return None
            rate, eta, elapsed = live.final_rate, 0.0, live.elapsed_s
            if not live.state.final:
                rate = self._rate(live)
                eta = max(live.expected_tokens - live.tokens, 0) / rate if rate > 0 else 0.0
                elapsed = time.monotonic() - live.run_started if live.run_started is not None else 0.0
            return Progress(job_id, live.state, live.total, live.done, live.tokens, rate, live.phase, eta, live.message,
                            live.predicted_s, elapsed)

    def wait(self, version: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> int:
        """Blocks until the board changes after ``version``, ``timeout`` passes or ``alive()`` turns false
        (checked every quarter second: a cancelled stream frees its watcher slot at once); returns the version."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.version == version and alive() and (left := deadline - time.monotonic()) > 0:
                self._changed.wait_for(lambda: self.version != version, min(left, 0.25))
            return self.version
