"""Feeds the scheduler from the store, a window at a time, so a job of millions of prompts never sits in
memory: the scheduler holds at most ``window`` waiting prompts, and the feeder reads the next ones
(oldest job first, by index) whenever fewer than half of that are left.

Each row is resolved as it is read (`coordinator.resolve.Resolver`): a prompt that can run becomes a
scheduler `Sequence`; one that cannot becomes an error result, which the engine stores like a
finished sequence. A cursor per job (the last index read) keeps a prompt from being read twice;
after a restart the cursor starts over and only prompts without a stored result are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.resolve import Resolved, Resolver
from coordinator.scheduler import Scheduler
from coordinator.scheduler import Sequence as Seq
from coordinator.settings import GenerationSettings
from coordinator.store import JobRecord, JobStore, ResultRecord


@dataclass
class _Cursor:
    settings: GenerationSettings
    after: int = -1  # last index read
    exhausted: bool = False


class Feeder:
    def __init__(self, store: JobStore, scheduler: Scheduler, resolver: Resolver, window: int = 2048) -> None:
        self.store, self.scheduler, self.resolver = store, scheduler, resolver
        self.window = max(window, 2)
        self._jobs: dict[str, _Cursor] = {}  # insertion order: oldest job first

    def add(self, record: JobRecord) -> None:
        if record.id not in self._jobs:
            self._jobs[record.id] = _Cursor(GenerationSettings.from_stored(record.params))

    def drop(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def jobs(self) -> list[str]:
        return list(self._jobs)

    @property
    def has_more(self) -> bool:
        """Some job has stored prompts the scheduler has not seen yet."""
        return any(not c.exhausted for c in self._jobs.values())

    def top_up(self) -> list[tuple[str, ResultRecord]]:
        """Reads prompts into the scheduler while fewer than half the window wait; returns the error
        results of prompts that cannot run (to be stored by the caller)."""
        room = self.window - len(self.scheduler.waiting)
        if room < self.window // 2:
            return []
        errors = []
        for job_id, cursor in list(self._jobs.items()):
            if room <= 0:
                break
            if cursor.exhausted:
                continue
            rows = self.store.pending_prompts(job_id, cursor.after, room)
            cursor.exhausted = len(rows) < room
            for row, resolved in zip(rows, self.resolver.stored_many(rows, cursor.settings)):
                cursor.after = row.index
                room -= 1
                if isinstance(resolved, ResultRecord):
                    errors.append((job_id, resolved))
                else:
                    self.scheduler.add(_sequence(job_id, row.index, resolved))
        return errors


def _sequence(job_id: str, index: int, r: Resolved) -> Seq:
    return Seq(job_id, index, r.prompt, r.max_new_tokens, r.stop_ids, r.sampling, stop_check=r.meta.stops,
               meta=r.meta)
