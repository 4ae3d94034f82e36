"""A daemon thread that calls ``tick()`` every ``interval`` seconds until its stop event is set.

The coordinator's background watches (stage health, automatic rejoin) run on it. A tick that raises
is logged and the loop goes on: one broken check must not end the watch.
"""

from __future__ import annotations

import threading
from typing import Callable

import structlog

log = structlog.get_logger(__name__)


def start_periodic(name: str, interval: float, tick: Callable[[], object], stop: threading.Event) -> threading.Thread:
    """Starts thread ``name`` calling ``tick`` every ``interval`` seconds until ``stop`` is set."""

    def run() -> None:
        while not stop.wait(interval):
            try:
                tick()
            except Exception:  # noqa: BLE001 - see the module docstring
                log.exception("periodic_tick_failed", thread=name)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
