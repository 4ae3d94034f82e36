"""Per-layer bit plans parsed from the forms users type, and their compact text form.

The bitwidth itself is `pqmesh.types.Bits`, the one definition every layer uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.types import Bits, parse_bits_list

_WIDTHS = ", ".join(str(b.value) for b in Bits)


def parse_bits_spec(spec: str, num_layers: int) -> list[Bits]:
    """A per-layer plan from a CLI value: a uniform width (``"4"``), a comma list with one entry per
    layer (``"16,8,4,4"``), or a JSON file holding a list or ``{"bits": [...]}``."""
    text = spec.strip()
    if not text:
        raise InvalidArgument(f"empty bits spec; give a width ({_WIDTHS}), a comma list or a JSON file")
    if "," in text:
        plan = parse_bits_list(part for part in text.split(",") if part.strip())
    elif text.endswith(".json") or Path(text).is_file():
        plan = _plan_from_file(Path(text))
    else:
        return [Bits.parse(text)] * num_layers
    if len(plan) != num_layers:
        raise InvalidArgument(
            f"bits spec has {len(plan)} entries but the model has {num_layers} layers; give one per layer"
        )
    return plan


def _plan_from_file(path: Path) -> list[Bits]:
    if not path.is_file():
        raise NotFound(f"bits plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"bits plan file {path} is not valid JSON: {err}") from err
    if isinstance(data, dict):
        data = data.get("bits")
    if not isinstance(data, list):
        raise InvalidArgument(f"bits plan file {path} must hold a list of widths or an object with a 'bits' list")
    return parse_bits_list(data)


def describe_plan(plan: Sequence[Bits]) -> str:
    """Compact text form, e.g. ``"4"`` for a uniform plan or ``"16,8,4,4"``."""
    values = [b.value for b in plan]
    if values and all(v == values[0] for v in values):
        return str(values[0])
    return ",".join(str(v) for v in values)
