"""The indicator file: per-layer sensitivity values per bitwidth, as `pqmesh indicator` writes them
and the planner reads them. One reader and one writer, torch-free.

Format, version 1 (JSON)::

    {"version": 1, "model": "opt-30b", "kind": "variance" | "variance-abs" | "direct" | "kl", "group_size": 128,
     "samples": 8, "seq_len": 512, "tokens": 4096,
     "layers": [{"layer": 0, "bits": {"16": 0.0, "8": 1e-4, "4": 0.02, "3": 0.09, "2": 0.4}}, ...]}

Layers are numbered 0..n-1, each once (in any order); "16" may be absent (it is 0). ``kind`` may be
absent (a hand-written table); other fields the writer adds are kept in ``meta``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.types import DEFAULT_GROUP_SIZE, Bits

VERSION = 1
KINDS = ("variance", "variance-abs", "direct", "kl")
_EXAMPLE = '{"version": 1, "layers": [{"layer": 0, "bits": {"8": ...}}]}'


@dataclass(frozen=True)
class IndicatorTable:
    """Indicator value per layer and bitwidth; 16 bits is always 0."""

    model: str
    kind: str
    group_size: int
    values: tuple[dict[Bits, float], ...]
    samples: int = 0
    seq_len: int = 0
    tokens: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.values)

    def value(self, layer: int, bits: Bits | int | str) -> float:
        bits = Bits.parse(bits)
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer {layer} is outside the indicator table's {self.num_layers} layers")
        if not bits.quantized:
            return 0.0
        if bits not in self.values[layer]:
            have = sorted(b.count for b in self.values[layer])
            raise InvalidArgument(
                f"the indicator table has no {bits.count}-bit value (it has {have}); rerun `pqmesh indicator --bits`"
            )
        return self.values[layer][bits]

    def to_json(self) -> dict:
        return {
            "version": VERSION, "model": self.model, "kind": self.kind, "group_size": self.group_size,
            "samples": self.samples, "seq_len": self.seq_len, "tokens": self.tokens, **self.meta,
            "layers": [
                {"layer": i, "bits": {str(b.count): v for b, v in sorted(row.items(), key=lambda kv: -kv[0].count)}}
                for i, row in enumerate(self.values)
            ],
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "indicator") -> IndicatorTable:
        """From the parsed JSON object; InvalidArgument says what is wrong and where (``source``)."""
        if not isinstance(data, dict) or data.get("version") != VERSION:
            found = data.get("version") if isinstance(data, dict) else None
            raise InvalidArgument(
                f"{source}: version {found!r}, this build reads version {VERSION}; "
                "regenerate it with `pqmesh indicator`"
            )
        if data.get("kind", "") not in ("", "default", *KINDS):  # "default": the planner's own 2^(-2b) table
            raise InvalidArgument(f"{source}: kind must be one of {KINDS}, got {data.get('kind')!r}")
        values = _layer_values(data.get("layers"), source)
        known = {"version", "model", "kind", "group_size", "samples", "seq_len", "tokens", "layers"}
        try:
            return cls(
                model=str(data.get("model", "")),
                kind=str(data.get("kind", "")),
                group_size=int(data.get("group_size", DEFAULT_GROUP_SIZE)),
                values=values,
                samples=int(data.get("samples", 0)),
                seq_len=int(data.get("seq_len", 0)),
                tokens=int(data.get("tokens", 0)),
                meta={k: v for k, v in data.items() if k not in known},
            )
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"{source}: {err}; expected {_EXAMPLE}") from None

    @classmethod
    def from_text(cls, text: str, source: str = "indicator") -> IndicatorTable:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"{source} is not valid JSON ({err}); expected {_EXAMPLE}") from None
        return cls.from_json(data, source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_indicator(path: str | Path) -> IndicatorTable:
    """Reads and validates an indicator file written by `pqmesh indicator`."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"indicator file {path} does not exist; create it with `pqmesh indicator`")
    return IndicatorTable.from_text(path.read_text(), f"indicator file {path}")


def _layer_values(rows, source: str) -> tuple[dict[Bits, float], ...]:
    """``{bits: value}`` per layer, in layer order, 16 bits set to 0; checks numbering and values."""
    if not isinstance(rows, list) or not rows:
        raise InvalidArgument(f"{source}: 'layers' must be a non-empty list; expected {_EXAMPLE}")
    shaped = (isinstance(r, dict) and isinstance(r.get("layer"), int) and isinstance(r.get("bits"), dict) for r in rows)
    if not all(shaped):
        raise InvalidArgument(f"{source}: every entry of 'layers' must be {{'layer': i, 'bits': {{...}}}}")
    rows = sorted(rows, key=lambda r: r["layer"])
    if [r["layer"] for r in rows] != list(range(len(rows))):
        raise InvalidArgument(f"{source}: layers must be numbered 0..{len(rows) - 1}, each once")
    values = []
    for i, row in enumerate(rows):
        try:
            parsed = {Bits.parse(k): float(v) for k, v in row["bits"].items()}
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"{source}: layer {i}: {err}") from None
        bad = {b.count: v for b, v in parsed.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise InvalidArgument(f"{source}: layer {i} has negative or non-finite values {bad}")
        parsed[Bits.B16] = 0.0
        values.append(parsed)
    return tuple(values)


