"""Bitwidths and phases as enums, with their wire forms (`pqmesh.common.v1.Bits` / `Phase`)."""

from __future__ import annotations

import enum

from pqmesh.errors import InvalidArgument


class Bits(enum.IntEnum):
    """Weight bitwidth of a decoder layer; the value is the number of bits (as on the wire)."""

    B2 = 2
    B3 = 3
    B4 = 4
    B8 = 8
    B16 = 16

    @classmethod
    def parse(cls, value: int | str) -> Bits:
        """From 16, "16", "BITS_16" or "int8"-style text; InvalidArgument names the valid values."""
        text = str(value).strip().lower().removeprefix("bits_").removeprefix("int").removeprefix("fp")
        try:
            return cls(int(text))
        except ValueError:
            raise InvalidArgument(f"unknown bitwidth {value!r}; use one of {[b.value for b in ALL_BITS]}") from None

    @classmethod
    def from_proto(cls, value: int) -> Bits:
        if value == 0:
            raise InvalidArgument("bits is BITS_UNSPECIFIED; set one of 2, 3, 4, 8, 16")
        return cls.parse(value)

    def to_proto(self) -> int:
        return int(self.value)


#: Highest first: the order in which "the highest bits that fit" is searched.
ALL_BITS: tuple[Bits, ...] = (Bits.B16, Bits.B8, Bits.B4, Bits.B3, Bits.B2)


class Phase(enum.IntEnum):
    """Generation phase; values match `pqmesh.common.v1.Phase`."""

    PREFILL = 1
    DECODE = 2

    @classmethod
    def parse(cls, value: int | str) -> Phase:
        text = str(value).strip().lower().removeprefix("phase_")
        for phase in cls:
            if text in (phase.name.lower(), str(phase.value)):
                return phase
        raise InvalidArgument(f"unknown phase {value!r}; use prefill or decode")

    def to_proto(self) -> int:
        return int(self.value)


def parse_bits_list(values) -> tuple[Bits, ...]:
    """Allowed bitwidths, highest first, deduplicated; empty input means all of them."""
    chosen = {Bits.parse(v) for v in values}
    return tuple(b for b in ALL_BITS if b in chosen) if chosen else ALL_BITS
