"""Child processes of the demo: start a pqmesh server, learn its port from its JSON log, stop it cleanly.

Each child runs in its own session (so a Ctrl-C in the terminal reaches only the demo, which then
stops the children in order with SIGTERM, and SIGKILL after a grace period). Its stderr (JSON log
lines) is copied to a log file; the first line with the awaited event tells the port it bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Sequence

from pqmesh.errors import Unavailable

GRACE_S = 10.0


class Child:
    """One server process whose readiness is a JSON log event carrying ``port``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict | None = None) -> None:
        self.name, self.argv, self.log_path = name, list(argv), log_path
        self.port: int | None = None
        self._ready = threading.Event()
        self._tail: deque[str] = deque(maxlen=20)
        self._event = ""
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log_path.open("a") as log:
            for line in self._proc.stderr:
                log.write(line)
                log.flush()
                self._tail.append(line.rstrip())
                if self.port is None and self._event and f'"{self._event}"' in line:
                    try:
                        self.port = int(json.loads(line)["port"])
                        self._ready.set()
                    except (ValueError, KeyError, TypeError):
                        pass
        self._ready.set()  # the process ended: wake a waiter

    def wait_ready(self, event: str = "grpc_server_started", timeout: float = 120.0) -> int:
        """The port from the first ``event`` log line; Unavailable if the child exits or takes too long."""
        self._event = event
        for line in list(self._tail):  # the line may have come before we asked
            if f'"{event}"' in line:
                try:
                    self.port = int(json.loads(line)["port"])
                except (ValueError, KeyError, TypeError):
                    pass
        deadline = time.monotonic() + timeout
        while self.port is None:
            if self._proc.poll() is not None:
                raise Unavailable(f"{self.name} exited with code {self._proc.returncode} before it was ready; "
                                  f"last log lines ({self.log_path}):\n" + "\n".join(self._tail))
            if time.monotonic() > deadline:
                raise Unavailable(f"{self.name} was not ready after {timeout:.0f} s; see {self.log_path}")
            self._ready.wait(0.2)
        return self.port

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""
        return self._proc.poll()

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a crash, not a stop) and reap the process."""
        self._proc.kill()
        self._proc.wait(GRACE_S)
        self._reader.join(timeout=5)

    def stop(self, grace: float = GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=5)
        return self._proc.returncode


class Children:
    """Started children, stopped in reverse order on exit (also on Ctrl-C or an error)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", env)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        self._children.remove(child)

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        try:
            while self._children:
                self._children.pop().stop()
        finally:
            signal.signal(signal.SIGINT, previous)
