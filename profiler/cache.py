"""Measured samples cached on disk, one versioned JSON file per bitwidth and setting, so a rerun with
the same device, model shape, dtype, grid and software is instant.

Key: device name (CPU model and threads, or GPU name), the model shape's dimensions (not its name:
two names for one shape share measurements), dtype, bits, quantization group size, layers per timed
shard, the grid, and the torch and pqmesh versions. The file name is a hash of the key; the key is
stored in the file too and compared on read, so a hash collision or a hand-edited file never passes.
Writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import structlog
import torch

from pqmesh import __version__
from profiler.fit import Sample

log = structlog.get_logger(__name__)
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    from pqmesh.model.embedded import cache_root

    return cache_root() / "profiles"


def cache_key(kind: str, **fields) -> dict:
    """The full key of one entry: `kind` ("layer" or "roofline") plus the given fields and versions."""
    key = {"format": CACHE_FORMAT, "kind": kind, "torch": torch.__version__, "pqmesh": __version__}
    key.update(fields)
    return json.loads(json.dumps(key, sort_keys=True))


def shape_key(shape) -> dict:
    """The shape's dimensions without its name."""
    data = asdict(shape)
    data.pop("name")
    return data


class ProfileCache:
    """Entries under `directory`; `None` disables caching."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory else None

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"{key['kind']}-{digest}.json"

    def get(self, key: dict) -> dict | None:
        """The stored value for `key`, or None (missing, other format, other key, unreadable)."""
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("format") != CACHE_FORMAT or data.get("key") != key:
            log.info("profile_cache_stale", path=str(path))
            return None
        return data["value"]

    def put(self, key: dict, value: dict) -> Path | None:
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        fd, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=self.directory)
        with os.fdopen(fd, "w") as out:
            json.dump({"format": CACHE_FORMAT, "key": key, "value": value}, out, indent=1, sort_keys=True)
        os.replace(staging, path)
        return path

    def get_samples(self, key: dict) -> list[Sample] | None:
        value = self.get(key)
        return None if value is None else [Sample.from_json(s) for s in value["samples"]]

    def put_samples(self, key: dict, samples: list[Sample]) -> Path | None:
        return self.put(key, {"samples": [s.to_json() for s in samples]})
