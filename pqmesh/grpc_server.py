"""What every pqmesh gRPC server shares: creation on an address (port 0 for tests), explicit message
size limits, the standard health service, server reflection (so `grpcurl` can list and describe),
and the one mapping from domain errors to gRPC status codes.
"""

from __future__ import annotations

import functools
from concurrent import futures
from typing import Callable, Iterable, Sequence

import grpc
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pqmesh.codec import MAX_MESSAGE_BYTES
from pqmesh.errors import InvalidArgument, PqmeshError
from pqmesh.security import Credentials, secure_channel

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
    credentials: Credentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    maximum_concurrent_rpcs: int | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a server on ``address`` ("host:port"; port 0 picks a free one).

    ``services`` holds (add_XServicer_to_server, servicer, full service name). Returns the server,
    the bound port and the health servicer (already SERVING for each service and for "").
    ``credentials`` with a certificate serves TLS (mutual TLS when it has a CA); ``interceptors`` run
    on every call (`pqmesh.security.server_interceptors`); past ``maximum_concurrent_rpcs`` calls in
    progress, new calls get RESOURCE_EXHAUSTED instead of queueing without bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=MESSAGE_OPTIONS,
        interceptors=[*interceptors, DecodeRequests()],
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server, pool=_MethodAwarePool())
    server_credentials = credentials.require_server().server_credentials() if credentials else None
    port = (
        server.add_secure_port(address, server_credentials) if server_credentials else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or not valid")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc_server_started", address=address, port=port, services=names,
             security=credentials.describe() if credentials else {"tls": False, "token": False})
    return server, port, health_servicer


class DecodeRequests(grpc.ServerInterceptor):
    """Requests to our services that do not parse as the method's message end INVALID_ARGUMENT with
    the parser's reason (gRPC itself answers INTERNAL "Exception deserializing request!")."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None or not details.method.startswith("/pqmesh."):
            return handler
        parse, method = handler.request_deserializer, details.method
        kind = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        expected = kind.full_name if kind is not None else "the method's request message"

        def problem(err: Exception) -> str:
            return f"{method}: the request does not parse as {expected} ({err}); send a serialized {expected}"

        def one(raw, context):
            try:
                return parse(raw)
            except Exception as err:  # noqa: BLE001 - DecodeError, or a string field that is not UTF-8
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem(err))

        def many(raws):
            for raw in raws:
                try:
                    yield parse(raw)
                except Exception as err:  # noqa: BLE001 - raised into the servicer, which maps PqmeshError
                    raise InvalidArgument(problem(err)) from None

        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        behaviour = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[(streaming_in, streaming_out)]
        if streaming_in:
            wrapped = lambda raws, context: behaviour(many(raws), context)  # noqa: E731
        elif streaming_out:
            def wrapped(raw, context):
                yield from behaviour(one(raw, context), context)
        else:
            wrapped = lambda raw, context: behaviour(one(raw, context), context)  # noqa: E731
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(streaming_in, streaming_out)]
        return make(wrapped, request_deserializer=None, response_serializer=handler.response_serializer)


def channel(address: str, credentials: Credentials | None = None) -> grpc.Channel:
    """A channel with the same message size limits as our servers; TLS and the bearer token as
    ``credentials`` say (insecure without them)."""
    return secure_channel(address, credentials, MESSAGE_OPTIONS)


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
