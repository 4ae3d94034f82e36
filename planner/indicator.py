"""Per-layer quantization sensitivity indicators and the quality setting of a plan.

Files (written by `pqmesh indicator`) are read by `pqmesh.quant.indicator_file`, the one reader
of that format; `Indicator` is the planner's hashable view of one. A request without a file gets
`shipped_indicator`, the measured file in ``planner/indicators/`` of a built-in model with the same
dimensions (an embedded model: SmolLM2-135M-Instruct, Gemma-3-270M), if there is one; else
`default_indicator`: the expected noise of b-bit uniform quantization is proportional to its step
squared, 2^(-2b), equal for every layer, normalized so that all layers at 4 bits sum to 1.0. A plan's
quality is the sum of its layers' indicators at their chosen bits; lower is better.

Quality setting: either a hard bound on that sum, or a weight theta that adds theta x sum
(in seconds per unit of indicator) to the minimized job time. With neither, the bound defaults to
the sum of the indicator at 4 bits over all layers: "no more total noise than uniform int4".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from planner.catalog import builtin_model
from planner.model_shapes import ModelShape
from pqmesh.errors import InvalidArgument
from pqmesh.quant.indicator_file import IndicatorTable, load_indicator
from pqmesh.types import STORED_BITS, Bits

log = structlog.get_logger(__name__)
INDICATOR_VERSION = 1
SHIPPED_DIR = Path(__file__).with_name("indicators")  # <built-in model name>.json, as `pqmesh indicator` wrote it


@dataclass(frozen=True)
class Indicator:
    """values[layer] = ((bits, added noise of that layer at those bits), ...); 0 at 16 bits.
    Dicts are accepted and stored as sorted tuples, so an indicator is hashable."""

    values: tuple
    model: str = ""
    kind: str = "default"
    group_size: int = 128
    version: int = INDICATOR_VERSION
    _rows: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = tuple(dict(row) for row in self.values)
        object.__setattr__(self, "values", tuple(tuple(sorted(row.items(), reverse=True)) for row in rows))
        object.__setattr__(self, "_rows", rows)
        if self.version != INDICATOR_VERSION:
            raise InvalidArgument(
                f"indicator version {self.version} is not supported; write version {INDICATOR_VERSION}"
            )
        if not self.values:
            raise InvalidArgument("indicator has no layers")
        for i, row in enumerate(self._rows):
            if not all(0 <= v < float("inf") for v in row.values()):  # NaN fails too
                raise InvalidArgument(
                    f"indicator layer {i} has a negative, infinite or NaN value; indicators are finite and >= 0"
                )

    @property
    def num_layers(self) -> int:
        return len(self.values)

    def row(self, layer: int) -> dict:
        return self._rows[layer]

    def value(self, layer: int, bits: Bits) -> float:
        row = self._rows[layer]
        if bits not in row:
            raise InvalidArgument(f"indicator lacks {bits.value}-bit values for layer {layer}; measure them "
                                  f"(pqmesh indicator --bits ...,{bits.value}) or leave {bits.value} out of the "
                                  "allowed bits")
        return row[bits]

    def check(self, num_layers: int, allowed: tuple[Bits, ...], model_name: str) -> None:
        """InvalidArgument unless it covers `num_layers` layers at every allowed bitwidth."""
        if self.num_layers != num_layers:
            raise InvalidArgument(f"indicator has {self.num_layers} layers but model {model_name!r} has {num_layers}; "
                                  "use an indicator computed for this model")
        for layer in range(num_layers):
            for bits in allowed:
                self.value(layer, bits)
        if self.model and self.model != model_name:
            log.warning("indicator_model_mismatch", indicator_model=self.model, model=model_name)

    def is_uniform(self) -> bool:
        """True when every layer has the same row (then only counts per bitwidth matter)."""
        return all(row == self.values[0] for row in self.values)

    def total(self, bits_per_layer) -> float:
        return sum(self.value(i, b) for i, b in enumerate(bits_per_layer))

    def to_json(self) -> str:
        """The indicator file's JSON (`pqmesh.quant.indicator_file`)."""
        table = IndicatorTable(self.model, self.kind, self.group_size, self._rows)
        return json.dumps(table.to_json())

    @classmethod
    def from_table(cls, table: IndicatorTable) -> Indicator:
        return cls(table.values, table.model, table.kind, table.group_size)

    @classmethod
    def from_json(cls, text: str, source: str = "indicator") -> Indicator:
        return cls.from_table(IndicatorTable.from_text(text, source))

    @classmethod
    def load(cls, path: str | Path) -> Indicator:
        return cls.from_table(load_indicator(path))


def shipped_indicator(shape: ModelShape) -> Indicator | None:
    """The shipped indicator of the built-in model whose dimensions are ``shape``'s (same
    fingerprint, whatever its name), or None."""
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        if builtin_model(path.stem).fingerprint == shape.fingerprint:
            log.info("indicator_shipped", file=path.name, model=shape.name)
            return Indicator.load(path)
    return None


def default_indicator(num_layers: int) -> Indicator:
    """2^(-2b) per layer, normalized so all layers at 4 bits sum to 1."""
    scale = num_layers * 2.0 ** -8
    row = {b: (0.0 if b == Bits.B16 else 2.0 ** (-2 * int(b)) / scale) for b in STORED_BITS}
    return Indicator(tuple(dict(row) for _ in range(num_layers)))


@dataclass(frozen=True)
class Quality:
    """At most one of `theta` (objective weight) and `bound` (hard limit on the summed indicator)."""

    theta: float | None = None
    bound: float | None = None

    def __post_init__(self) -> None:
        if self.theta is not None and self.bound is not None:
            raise InvalidArgument("give either theta or a quality bound, not both")
        if any(v is not None and not 0 <= v < float("inf") for v in (self.theta, self.bound)):  # NaN fails too
            raise InvalidArgument(
                f"theta and the quality bound must be finite and >= 0, got {self.theta}, {self.bound}"
            )

    def resolved(self, indicator: Indicator) -> Quality:
        """The default (neither given) becomes the bound of uniform 4-bit."""
        if self.theta is None and self.bound is None:
            return Quality(bound=sum(indicator.value(i, Bits.B4) for i in range(indicator.num_layers)))
        return self
