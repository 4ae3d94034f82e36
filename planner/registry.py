"""Registered device profiles, persisted in one SQLite file under the planner's state directory.

Each call opens its own connection (the gRPC server calls from a thread pool); writes are single
statements, so a crash never leaves a half-written profile. Profiles are stored as their proto JSON.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import structlog

from planner.devices import DeviceProfile

log = structlog.get_logger(__name__)
DB_NAME = "planner.sqlite3"
SCHEMA = """CREATE TABLE IF NOT EXISTS device_profiles (
    name TEXT PRIMARY KEY,
    profile_json TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)"""


class ProfileRegistry:
    """Device profiles by name. `get` matches `cluster.ProfileLookup`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def put(self, profile: DeviceProfile) -> bool:
        """Store or replace; True when a profile of that name existed."""
        with closing(self._connect()) as db, db:
            existed = db.execute("SELECT 1 FROM device_profiles WHERE name = ?", (profile.name,)).fetchone() is not None
            db.execute(
                "INSERT INTO device_profiles (name, profile_json) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                "profile_json = excluded.profile_json, updated_at = excluded.updated_at",
                (profile.name, profile.to_json()),
            )
        log.info("device_registered", name=profile.name, device_type=profile.device_type, replaced=existed)
        return existed

    def get(self, name: str) -> DeviceProfile | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT profile_json FROM device_profiles WHERE name = ?", (name,)).fetchone()
        return DeviceProfile.from_json(row[0]) if row else None

    def list(self) -> list[DeviceProfile]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT profile_json FROM device_profiles ORDER BY name").fetchall()
        return [DeviceProfile.from_json(r[0]) for r in rows]

    def names(self) -> list[str]:
        with closing(self._connect()) as db:
            return [r[0] for r in db.execute("SELECT name FROM device_profiles ORDER BY name")]
