"""Transport security for every pqmesh server and client: TLS, mutual TLS, a shared bearer token and
per-method client identities (certificate subject CN).

`Credentials` is filled from flags once at start-up (`add_flags` / `from_args`); the files are read
then, so a wrong path stops the process with a message naming the flag and the path. Servers take
`server_credentials()` and `interceptors()`; clients take `channel_credentials()` and the token
interceptor through `pqmesh.grpc_server.channel(address, credentials)`.

Health checks (`grpc.health.v1.Health`) never need the token, so probes keep working; with mutual
TLS the handshake itself still needs a client certificate signed by the CA.
"""

from __future__ import annotations

import argparse
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import grpc
import structlog

from pqmesh.errors import InvalidArgument

log = structlog.get_logger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION = "authorization"
BEARER = "Bearer "


@dataclass(frozen=True)
class Credentials:
    """PEM bytes and a token, read at start-up. Server side: ``cert``/``key`` serve TLS and ``ca``
    turns on mutual TLS (clients must present a certificate signed by it). Client side: ``ca``
    verifies the server, ``cert``/``key`` are the client's own identity for mutual TLS."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: str | None = None
    server_name: str = ""  # client only: the name expected on the server certificate, if not the host
    paths: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument(
                "--tls-cert and --tls-key go together: give both (certificate and its private key) or neither"
            )

    @property
    def tls(self) -> bool:
        return self.cert is not None or self.ca is not None

    @property
    def mutual(self) -> bool:
        """Server side: clients must present a certificate signed by ``ca``."""
        return self.cert is not None and self.ca is not None

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, cert: Path | None = None, key: Path | None = None, ca: Path | None = None,
                   token_file: Path | None = None, server_name: str = "", prefix: str = "") -> "Credentials":
        """Reads the files now; a missing, unreadable or non-PEM file raises InvalidArgument naming its flag."""
        paths = {name: str(path) for name, path in (("cert", cert), ("key", key), ("ca", ca), ("token", token_file))
                 if path is not None}
        return cls(_pem(cert, f"--{prefix}tls-cert", "CERTIFICATE"), _pem(key, f"--{prefix}tls-key", "PRIVATE KEY"),
                   _pem(ca, f"--{prefix}tls-ca", "CERTIFICATE"), _token(token_file, f"--{prefix}auth-token-file"),
                   server_name, paths)

    def require_server(self) -> "Credentials":
        """Checks the combination makes sense for a server."""
        if self.ca is not None and self.cert is None:
            raise InvalidArgument("--tls-ca (verify client certificates) needs --tls-cert and --tls-key: "
                                  "a server can only ask for client certificates over TLS")
        return self

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.tls else []

    def describe(self) -> dict:
        """For start-up logs: which protections are on (never the secrets)."""
        return {"tls": self.cert is not None or self.ca is not None, "mutual_tls": self.mutual,
                "token": self.token is not None, **{f"{k}_file": v for k, v in self.paths.items()}}


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"{flag} {path}: no such file; fix the path or drop the flag") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{flag} {path} is a directory; give the file itself") from None
    except PermissionError:
        raise InvalidArgument(f"{flag} {path}: permission denied; let this service's user read it "
                              "(e.g. chgrp pqmesh and chmod 640)") from None
    except OSError as err:
        raise InvalidArgument(f"{flag} {path}: cannot read it ({err.strerror})") from None


def _pem(path: Path | None, flag: str, kind: str) -> bytes | None:
    if path is None:
        return None
    data = _read(path, flag)
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise InvalidArgument(
            f"{flag} {path} is not a PEM {kind.lower()} (expected a '-----BEGIN ...{kind}-----' block)"
        )
    return data


def _token(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        token = _read(path, flag).decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"{flag} {path} must hold one printable ASCII token (e.g. `openssl rand -hex 32`)"
        ) from None
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise InvalidArgument(
            f"{flag} {path} must hold one non-empty token without spaces (e.g. `openssl rand -hex 32`)"
        )
    if len(token) < 16:
        raise InvalidArgument(f"{flag} {path}: the token has {len(token)} characters; use at least 16 "
                              "(e.g. `openssl rand -hex 32`)")
    return token


# -- flags ------------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser, prefix: str = "", server: bool = True, peer: str = "") -> None:
    """``--{prefix}tls-cert``, ``--{prefix}tls-key``, ``--{prefix}tls-ca``, ``--{prefix}auth-token-file``
    (and ``--{prefix}tls-server-name`` on a client). ``peer`` names what a client connects to."""
    group = parser.add_argument_group(f"security{' (' + peer + ')' if peer else ''}")
    if server:
        group.add_argument(f"--{prefix}tls-cert", type=Path, help="serve TLS with this PEM certificate (chain)")
        group.add_argument(f"--{prefix}tls-key", type=Path, help="PEM private key of --tls-cert")
        group.add_argument(f"--{prefix}tls-ca", type=Path,
                           help="mutual TLS: require client certificates signed by this PEM CA")
        group.add_argument(f"--{prefix}auth-token-file", type=Path,
                           help="require 'authorization: Bearer <token>' on every call but health checks")
    else:
        group.add_argument(
            f"--{prefix}tls-ca", type=Path, help=f"use TLS; verify {peer or 'the server'} with this PEM CA"
        )
        group.add_argument(f"--{prefix}tls-cert", type=Path, help="mutual TLS: this client's PEM certificate")
        group.add_argument(
            f"--{prefix}tls-key", type=Path, help="mutual TLS: PEM private key of the client certificate"
        )
        group.add_argument(f"--{prefix}tls-server-name", default="",
                           help="name on the server certificate when it differs from the address host")
        group.add_argument(
            f"--{prefix}auth-token-file", type=Path, help="send 'authorization: Bearer <token>' read from this file"
        )


def from_args(args: argparse.Namespace, prefix: str = "") -> Credentials:
    """Reads the files named by the flags `add_flags` registered (InvalidArgument on a bad one)."""
    attr = prefix.replace("-", "_")
    get = lambda name: getattr(args, attr + name, None)  # noqa: E731
    return Credentials.from_files(get("tls_cert"), get("tls_key"), get("tls_ca"), get("auth_token_file"),
                                  get("tls_server_name") or "", prefix)


# -- server side: token and client identity ---------------------------------------------------------
def peer_common_names(context: grpc.ServicerContext) -> list[str]:
    """Subject CNs of the client certificate (empty without mutual TLS)."""
    names = (context.auth_context() or {}).get("x509_common_name", [])
    return [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]


def _deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with ``code``."""

    def unary(request, context):
        context.abort(code, message)

    def streaming(request, context):
        context.abort(code, message)
        yield  # pragma: no cover - makes this a generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call but health checks needs ``authorization: Bearer <token>``; else UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        values = [v for k, v in (details.invocation_metadata or ()) if k == AUTHORIZATION]
        if not values:
            return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                 f"{details.method} needs metadata 'authorization: Bearer <token>'; "
                                 "give the client --auth-token-file with the server's token")
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        given = value[len(BEARER):].encode() if value.startswith(BEARER) else b""
        if not hmac.compare_digest(given, self._expected):
            return _deny_handler(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{details.method}: the bearer token is wrong; use the token file the server was started with",
            )
        return handler


class IdentityInterceptor(grpc.ServerInterceptor):
    """Methods in ``allowed`` (full method name -> subject CNs) answer only clients whose certificate
    carries one of those CNs; anyone else gets PERMISSION_DENIED. Other methods are untouched."""

    def __init__(self, allowed: Mapping[str, Iterable[str]]) -> None:
        self._allowed = {method: frozenset(names) for method, names in allowed.items()}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        names = self._allowed.get(details.method)
        if handler is None or names is None:
            return handler
        return _guarded(handler, details.method, names)


def _guarded(handler: grpc.RpcMethodHandler, method: str, names: frozenset[str]) -> grpc.RpcMethodHandler:
    def check(context) -> None:
        cns = peer_common_names(context)
        if not names.intersection(cns):
            who = f"client certificate CN {cns}" if cns else "a client without a certificate"
            log.warning("rpc_permission_denied", method=method, peer=context.peer(), common_names=cns)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method} is refused to {who}; allowed CNs: {sorted(names)} "
                          "(issue the caller a certificate with one of them, or add --allowed-client-cn)")

    def wrap(behaviour: Callable, streaming_response: bool) -> Callable:
        if streaming_response:
            def call(request, context):
                check(context)
                yield from behaviour(request, context)
        else:
            def call(request, context):
                check(context)
                return behaviour(request, context)
        return call

    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(behaviour, handler.response_streaming), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def server_interceptors(credentials: Credentials | None,
                        allowed: Mapping[str, Iterable[str]] | None = None) -> list[grpc.ServerInterceptor]:
    """Token check first (cheap, no auth context needed), then per-method identities."""
    out: list[grpc.ServerInterceptor] = []
    if credentials is not None and credentials.token is not None:
        out.append(TokenInterceptor(credentials.token))
    if allowed:
        out.append(IdentityInterceptor(allowed))
    return out


# -- client side: attach the token ------------------------------------------------------------------
class _ClientToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._pair = (AUTHORIZATION, BEARER + token)

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._pair]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: object
    wait_for_ready: bool | None
    compression: object


def secure_channel(address: str, credentials: Credentials | None, options: list) -> grpc.Channel:
    """A channel to ``address`` with TLS (when ``credentials`` says so) and the token attached."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    creds = credentials.channel_credentials()
    options = [*options, *credentials.channel_options()]
    chan = (
        grpc.secure_channel(address, creds, options=options)
        if creds
        else grpc.insecure_channel(address, options=options)
    )
    if credentials.token is not None:
        chan = grpc.intercept_channel(chan, _ClientToken(credentials.token))
    return chan
