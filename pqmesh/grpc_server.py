"""What every pqmesh gRPC server shares: creation on an address (port 0 for tests), explicit message
size limits, the standard health service, server reflection (so `grpcurl` can list and describe),
and the one mapping from domain errors to gRPC status codes.
"""

from __future__ import annotations

import functools
from concurrent import futures
from typing import Callable, Iterable

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pqmesh.codec import MAX_MESSAGE_BYTES
from pqmesh.errors import PqmeshError

log = structlog.get_logger(__name__)

MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class _MethodAwarePool:
    """The default descriptor pool, plus lookups of method symbols (``pkg.Service.Method``), which
    the C++-backed pool does not resolve (grpc/grpc#34743); `grpcurl describe` of a method needs them."""

    def __init__(self, pool=None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 - the DescriptorPool API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in found.methods_by_name:
                raise KeyError(symbol) from None
            return found.file

    def __getattr__(self, name: str):
        return getattr(self._pool, name)


def create_server(
    address: str,
    services: Iterable[tuple[Callable[[object, grpc.Server], None], object, str]],
    max_workers: int = 16,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a server on ``address`` ("host:port"; port 0 picks a free one).

    ``services`` holds (add_XServicer_to_server, servicer, full service name). Returns the server,
    the bound port and the health servicer (already SERVING for each service and for "").
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=MESSAGE_OPTIONS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server, pool=_MethodAwarePool())
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or not valid")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc_server_started", address=address, port=port, services=names)
    return server, port, health_servicer


def channel(address: str) -> grpc.Channel:
    """An insecure channel with the same message size limits as our servers."""
    return grpc.insecure_channel(address, options=MESSAGE_OPTIONS)


def status_code(error: PqmeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def rpc_errors(method):
    """Wraps a unary servicer method: a `PqmeshError` aborts with its status and message; anything
    else aborts with INTERNAL and is logged with its traceback. The server keeps serving."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except PqmeshError as err:
            context.abort(status_code(err), str(err))
        except Exception as err:  # noqa: BLE001 - the boundary: log it, tell the caller, keep serving
            log.exception("rpc_failed", method=method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")

    return wrapper
