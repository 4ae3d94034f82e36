"""Automatic rejoin (``--rejoin-interval``): a thread that notices lost devices whose stages answer again.

Every interval it probes the stage server of each device the coordinator lost. When some answer that
were not tried yet, it asks for a re-plan with them (`coordinator.rejoin.MeshChanges.replan_mesh`,
without ``force``: the mesh switches only to a plan predicted to be faster). Devices whose re-plan
did not switch are not tried again while they stay lost and answering, so a returning device that
does not help costs one planner call, not one per interval; a refusal (e.g. the mesh is in an outage)
is retried at the next interval.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import structlog

from coordinator.periodic import start_periodic
from pqmesh.errors import PqmeshError

log = structlog.get_logger(__name__)


@dataclass
class RejoinWatch:
    """``lost()`` names the lost devices, ``answers(name)`` says whether one's stage server answers, and
    ``replan(names)`` re-plans with them and returns a `coordinator.rejoin.Outcome`."""

    lost: Callable[[], set[str]]
    answers: Callable[[str], bool]
    replan: Callable[[tuple[str, ...]], object]
    interval: float
    _tried: set[str] = field(default_factory=set)  # back, re-planned with, not switched
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        start_periodic("coordinator-rejoin", self.interval, self.check, self._stop)

    def stop(self) -> None:
        self._stop.set()

    def check(self):
        """One round: the Outcome of a re-plan it asked for, or None."""
        lost = self.lost()
        back = {name for name in sorted(lost) if self.answers(name)}
        self._tried &= back  # lost again, or no longer lost: worth a new try when it is back
        if not back or back <= self._tried:
            return None
        names = tuple(sorted(back))
        try:
            outcome = self.replan(names)
        except PqmeshError as err:
            log.warning("rejoin_refused", devices=list(names), error=str(err))
            return None
        if not outcome.switched:
            self._tried |= back
        log.info("rejoin_checked", devices=list(names), switched=outcome.switched, message=outcome.message)
        return outcome
