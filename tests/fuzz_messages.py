"""Hypothesis strategies for random and malformed protobuf requests, and a generic caller that sends
any of them (or raw bytes) to any method of a running server and returns the status it ended with.

`message(descriptor)` fills a random subset of fields with values from the whole range of each
type (negative, huge, NaN, unknown enum numbers, any Unicode), recursing into sub-messages;
``hints`` bias named string fields toward values the server knows (a real job id, a loaded plan),
so the fuzzer gets past "not found" into the logic behind it. `serialize` can then break the UTF-8
of a string field while keeping the wire framing valid.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Mapping

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import strategies as st

F = FieldDescriptor
_INT_RANGES = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
BAD_UTF8_MARKER = "\ue000"  # 3 bytes in UTF-8, replaced on the wire by 3 bytes that are not UTF-8
_BAD_UTF8 = b"\xff\xfe\xc0"
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (lo, hi, 0, 1, 2, 7, -1, 2**31 - 1, 2**32 - 1, 2**63 - 1) if lo <= v <= hi]
    return st.one_of(st.integers(max(lo, 0), min(hi, 16)), st.sampled_from(edges), st.integers(lo, hi))


def strings(hint: Iterable[str] = ()) -> st.SearchStrategy[str]:
    base = st.one_of(st.text(max_size=24), st.just(""), st.just(BAD_UTF8_MARKER),
                     st.sampled_from(["..", "../etc", "/etc/passwd", "a/b", "\x00", "x" * 5000]))
    hint = list(hint)
    return st.one_of(st.sampled_from(hint), st.sampled_from(hint), base) if hint else base


def scalar(field: FieldDescriptor, hints: Mapping[str, Iterable]) -> st.SearchStrategy:
    if field.name in hints and field.type != F.TYPE_STRING:
        return st.one_of(st.sampled_from(list(hints[field.name])), _plain(field))
    if field.type == F.TYPE_STRING:
        return strings(hints.get(field.name, ()))
    return _plain(field)


def _plain(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in _INT_RANGES:
        return integers(*_INT_RANGES[field.type])
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e300]))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), integers(-2**31, 2**31 - 1))
    raise TypeError(field.type)


@st.composite
def message(draw, descriptor: Descriptor, hints: Mapping[str, Iterable] | None = None, depth: int = 0):
    """A random instance of ``descriptor``'s message class."""
    hints = hints or {}
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        target = getattr(msg, field.name) if field.is_repeated or field.message_type else None
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth >= 3:
                continue
            if field.is_repeated:
                for sub in draw(st.lists(message(field.message_type, hints, depth + 1), max_size=3)):
                    target.add().CopyFrom(sub)
            else:
                target.CopyFrom(draw(message(field.message_type, hints, depth + 1)))
        elif field.is_repeated:
            target.extend(draw(st.lists(scalar(field, hints), max_size=6)))
        else:
            setattr(msg, field.name, draw(scalar(field, hints)))
    return msg


def serialize(msg) -> bytes:
    """Wire bytes; every BAD_UTF8_MARKER in a string field becomes invalid UTF-8 of the same length."""
    return msg.SerializeToString().replace(BAD_UTF8_MARKER.encode(), _BAD_UTF8)


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call(chan: grpc.Channel, method: MethodDescriptor, requests: list[bytes], timeout: float = 10.0,
         max_responses: int | None = None) -> tuple[grpc.StatusCode, str, float]:
    """Sends raw request bytes to ``method`` (one for unary requests, the list for a stream) and
    reads at most ``max_responses`` replies; returns (status code, details, seconds)."""
    name = path(method)
    started = time.monotonic()
    try:
        if method.client_streaming and method.server_streaming:
            responses = chan.stream_stream(name)(iter(requests), timeout=timeout)
        elif method.client_streaming:
            chan.stream_unary(name)(iter(requests), timeout=timeout)
            return grpc.StatusCode.OK, "", time.monotonic() - started
        elif method.server_streaming:
            responses = chan.unary_stream(name)(requests[0], timeout=timeout)
        else:
            chan.unary_unary(name)(requests[0], timeout=timeout)
            return grpc.StatusCode.OK, "", time.monotonic() - started
        for count, _ in enumerate(responses, 1):
            if max_responses is not None and count >= max_responses:
                responses.cancel()
                break
        return grpc.StatusCode.OK, "", time.monotonic() - started
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and max_responses is not None:
            return grpc.StatusCode.OK, "", time.monotonic() - started
        return err.code(), err.details() or "", time.monotonic() - started


def check(outcome: tuple[grpc.StatusCode, str, float], what: str) -> None:
    code, details, seconds = outcome
    assert code not in NEVER, f"{what}: {code.name} after {seconds:.1f} s: {details}"
