"""Byte counts as people read them: the one formatter every message and report uses."""

from __future__ import annotations

_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def format_bytes(n: float) -> str:
    """``format_bytes(3 << 30) == "3.00 GiB"``, ``format_bytes(1536) == "1.50 KiB"``; below 1 KiB in bytes."""
    size = abs(n)
    for scale, name in _UNITS:
        if size >= scale:
            return f"{n / scale:.2f} {name}"
    return f"{int(n)} B"
