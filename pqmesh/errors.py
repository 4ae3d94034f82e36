"""Domain errors shared by every part; each names the gRPC status it maps to.

Library code raises these; `pqmesh.grpc_server.status_code` (used by the `rpc_errors` decorator on
every servicer method) turns them into a status code and message, so the mapping lives in one place
and messages say what the caller should change.
"""

from __future__ import annotations


class PqmeshError(Exception):
    """Base class; ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "INTERNAL"


class InvalidArgument(PqmeshError):
    code = "INVALID_ARGUMENT"


class OutOfRange(PqmeshError):
    code = "OUT_OF_RANGE"


class FailedPrecondition(PqmeshError):
    code = "FAILED_PRECONDITION"


class NotFound(PqmeshError):
    code = "NOT_FOUND"


class ResourceExhausted(PqmeshError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(PqmeshError):
    code = "UNAVAILABLE"


class AlreadyExists(PqmeshError):
    code = "ALREADY_EXISTS"


class Aborted(PqmeshError):
    """Lost a race with a concurrent change (e.g. the mesh re-planned meanwhile): try again."""

    code = "ABORTED"


class UnsupportedModel(InvalidArgument):
    """A checkpoint or config this build cannot run (family, feature or layout)."""
