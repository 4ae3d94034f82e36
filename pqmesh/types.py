"""The shared vocabulary of every layer: bitwidths, phases, stage roles and dtype names.

One definition each, with its wire form: `Bits`, `Phase` and `Role` have the numbers of the proto
enums `pqmesh.common.v1.Bits`, `pqmesh.common.v1.Phase` and `pqmesh.stage.v1.Role`, so `to_proto`
is the value and `from_proto` refuses the unspecified 0. Nothing here imports torch or gRPC stubs:
the planner and the CLI use it without loading either.
"""

from __future__ import annotations

import enum
from typing import Iterable

from pqmesh.errors import InvalidArgument

_PREFIXES = ("bits_", "bits", "int", "uint", "w", "b", "fp", "bf")
_SUFFIXES = ("bits", "bit", "b")


class Bits(enum.IntEnum):
    """A decoder layer's weight bitwidth; the value is the number of bits (as on the wire).

    `Bits.B16` means "not quantized": the layer keeps the stage's own 16-bit (on a CPU, 32-bit) dtype.
    """

    B16 = 16
    B8 = 8
    B6 = 6
    B5 = 5
    B4 = 4
    B3 = 3
    B2 = 2

    @property
    def count(self) -> int:
        return int(self.value)

    @property
    def quantized(self) -> bool:
        return self is not Bits.B16

    @property
    def planes(self) -> tuple[int, ...]:
        """Widths of the bit planes a code of this width is packed in (`pqmesh.quant.packing`), low
        bits first: one plane of 8, 4 or 2 bits, or two (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2)."""
        if not self.quantized:
            raise InvalidArgument("16-bit weights are not packed")
        return _PLANES[self.value]

    @property
    def levels(self) -> int:
        """Largest integer code of this width (``2**bits - 1``)."""
        return (1 << self.value) - 1

    @classmethod
    def parse(cls, value: Bits | int | str) -> Bits:
        """From a `Bits`, an int (the bit count, which is also the proto number) or text such as
        ``"4"``, ``"int4"``, ``"4bit"``, ``"BITS_4"`` or ``"fp16"``; InvalidArgument names the choices."""
        if isinstance(value, Bits):
            return value
        if isinstance(value, bool):
            raise InvalidArgument(f"unknown bitwidth {value!r}; use one of {_choices()}")
        if isinstance(value, int):
            return cls._from_int(value, repr(value))
        if isinstance(value, str):
            text = value.strip().lower()
            for prefix in _PREFIXES:
                if text.startswith(prefix) and text[len(prefix) :].strip("_").isdigit():
                    text = text[len(prefix) :].strip("_")
                    break
            for suffix in _SUFFIXES:
                if text.endswith(suffix) and text[: -len(suffix)].isdigit():
                    text = text[: -len(suffix)]
                    break
            if text.isdigit():
                return cls._from_int(int(text), repr(value))
        raise InvalidArgument(f"unknown bitwidth {value!r}; use one of {_choices()}")

    @classmethod
    def _from_int(cls, number: int, shown: str) -> Bits:
        for member in cls:
            if member.value == number:
                return member
        raise InvalidArgument(f"unknown bitwidth {shown}; use one of {_choices()}")

    def to_proto(self) -> int:
        """The `pqmesh.common.v1.Bits` enum number (``BITS_4 = 4``)."""
        return int(self.value)

    @classmethod
    def from_proto(cls, number: int) -> Bits:
        if number == 0:
            raise InvalidArgument(f"bitwidth is unspecified (BITS_UNSPECIFIED); set one of {_choices()}")
        return cls._from_int(int(number), f"proto enum number {number}")


_PLANES: dict[int, tuple[int, ...]] = {8: (8,), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,)}

#: Every width the storage format holds, highest first.
STORED_BITS: tuple[Bits, ...] = tuple(sorted(Bits, reverse=True))

#: The widths a plan chooses from unless told otherwise (LLM-PQ's 16/8/4/3 plus 2), highest first:
#: the order in which "the highest bits that fit" is searched. 6 and 5 bits are opt-in (``--bits
#: 16,8,6,5,4,3``): they give the planner 1-bit steps between 4 and 8, and need an indicator that
#: measured them (the shipped ones hold 8/4/3/2).
ALL_BITS: tuple[Bits, ...] = (Bits.B16, Bits.B8, Bits.B4, Bits.B3, Bits.B2)


def _choices() -> str:
    return ", ".join(str(b.value) for b in Bits)


def parse_bits_list(values: Iterable[Bits | int | str]) -> list[Bits]:
    """A per-layer plan: one `Bits` per value, in the order given."""
    return [Bits.parse(v) for v in values]


def allowed_bits(values: Iterable[Bits | int | str]) -> tuple[Bits, ...]:
    """A set of bitwidths to choose from: highest first, deduplicated; empty input means the default
    set, `ALL_BITS` (any of `STORED_BITS` may be named)."""
    chosen = {Bits.parse(v) for v in values}
    return tuple(b for b in STORED_BITS if b in chosen) if chosen else ALL_BITS


class Phase(enum.IntEnum):
    """Generation phase; values match `pqmesh.common.v1.Phase`."""

    PREFILL = 1
    DECODE = 2

    @classmethod
    def parse(cls, value: Phase | int | str) -> Phase:
        text = str(int(value) if isinstance(value, int) else value).strip().lower().removeprefix("phase_")
        for phase in cls:
            if text in (phase.name.lower(), str(phase.value)):
                return phase
        raise InvalidArgument(f"unknown phase {value!r}; use prefill or decode")

    def to_proto(self) -> int:
        return int(self.value)


class Role(enum.IntEnum):
    """What a stage does besides its layers; values match `pqmesh.stage.v1.Role`."""

    FIRST = 1  # embeds token ids, sends hidden states on
    MIDDLE = 2  # hidden states in, hidden states out
    LAST = 3  # hidden states in; final norm, LM head and sampling
    ONLY = 4  # the whole model: token ids in, token ids out

    @classmethod
    def of(cls, start: int, end: int, num_layers: int) -> Role:
        """The role of a stage holding layers [start, end) of a ``num_layers``-layer model."""
        first, last = start == 0, end == num_layers
        return {(True, True): cls.ONLY, (True, False): cls.FIRST, (False, True): cls.LAST}.get(
            (first, last), cls.MIDDLE
        )

    @property
    def embeds(self) -> bool:
        return self in (Role.FIRST, Role.ONLY)

    @property
    def samples(self) -> bool:
        return self in (Role.LAST, Role.ONLY)

    def to_proto(self) -> int:
        return int(self.value)

    @classmethod
    def from_proto(cls, number: int) -> Role:
        try:
            return cls(int(number))
        except ValueError:
            raise InvalidArgument("role must be ROLE_FIRST, ROLE_MIDDLE, ROLE_LAST or ROLE_ONLY") from None


#: Weights per quantization group (one scale and one offset each) unless a plan says otherwise.
DEFAULT_GROUP_SIZE = 128

#: Bytes per element of the dtypes a stage computes in (activations, KV cache, 16-bit weights).
DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
DEFAULT_DTYPE = "float16"


def parse_dtype(name: str, what: str = "dtype", hint: str = "") -> str:
    """A dtype name from `DTYPE_BYTES`; InvalidArgument names the field (``what``), the choices and ``hint``."""
    if name not in DTYPE_BYTES:
        raise InvalidArgument(f"{what} {name!r} is not supported; use one of {', '.join(DTYPE_BYTES)}{hint}")
    return name
