"""Weight bitwidths as an enum, and per-layer bit plans parsed from the forms users type.

`Bits` is the one type the rest of pqmesh passes around; its value is the bit count, which is also
the number of the matching `pqmesh.common.v1.Bits` proto enum member (``BITS_4 = 4``). `Bits.B16`
means "not quantized": the layer keeps the model's own 16-bit (or, on CPU, 32-bit) dtype.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Iterable, Sequence

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.errors import InvalidArgument, NotFound

_PREFIXES = ("bits_", "bits", "int", "uint", "w", "b", "fp", "bf")
_SUFFIXES = ("bits", "bit", "b")


class Bits(enum.Enum):
    """A decoder layer's weight bitwidth; the value is the number of bits."""

    B16 = 16
    B8 = 8
    B4 = 4
    B3 = 3
    B2 = 2

    @property
    def count(self) -> int:
        return self.value

    @property
    def quantized(self) -> bool:
        return self is not Bits.B16

    @property
    def levels(self) -> int:
        """Largest integer code of this width (``2**bits - 1``)."""
        return (1 << self.value) - 1

    @classmethod
    def parse(cls, value: "Bits | int | str") -> "Bits":
        """Accepts a `Bits`, an int (bit count or proto enum number) or a string such as
        ``"4"``, ``"int4"``, ``"4bit"``, ``"BITS_4"`` or ``"fp16"``."""
        if isinstance(value, Bits):
            return value
        if isinstance(value, bool):
            raise InvalidArgument(f"bitwidth must be one of {_choices()}, got {value!r}")
        if isinstance(value, int):
            return cls._from_int(value, repr(value))
        if isinstance(value, str):
            text = value.strip().lower()
            for prefix in _PREFIXES:
                if text.startswith(prefix) and text[len(prefix):].strip("_").isdigit():
                    text = text[len(prefix):].strip("_")
                    break
            for suffix in _SUFFIXES:
                if text.endswith(suffix) and text[: -len(suffix)].isdigit():
                    text = text[: -len(suffix)]
                    break
            if text.isdigit():
                return cls._from_int(int(text), repr(value))
        raise InvalidArgument(f"bitwidth must be one of {_choices()}, got {value!r}")

    @classmethod
    def _from_int(cls, number: int, shown: str) -> "Bits":
        for member in cls:
            if member.value == number:
                return member
        raise InvalidArgument(f"bitwidth must be one of {_choices()}, got {shown}")

    def to_proto(self) -> int:
        """The `pqmesh.common.v1.Bits` enum number."""
        return tensor_pb2.Bits.Value(f"BITS_{self.value}")

    @classmethod
    def from_proto(cls, number: int) -> "Bits":
        if number == tensor_pb2.BITS_UNSPECIFIED:
            raise InvalidArgument(f"bitwidth is unspecified; set one of {_choices()}")
        return cls._from_int(int(number), f"proto enum number {number}")


def _choices() -> str:
    return ", ".join(str(b.value) for b in Bits)


def parse_bits_list(values: Iterable["Bits | int | str"]) -> list[Bits]:
    return [Bits.parse(v) for v in values]


def parse_bits_spec(spec: str, num_layers: int) -> list[Bits]:
    """A per-layer plan from a CLI value: a uniform width (``"4"``), a comma list with one entry per
    layer (``"16,8,4,4"``), or a JSON file holding a list or ``{"bits": [...]}``."""
    text = spec.strip()
    if not text:
        raise InvalidArgument(f"empty bits spec; give a width ({_choices()}), a comma list or a JSON file")
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
