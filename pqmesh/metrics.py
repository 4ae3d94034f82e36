"""Prometheus metrics shared by every pqmesh process: a registry per process, the RPC error counter
(a gRPC server interceptor), and the optional HTTP exporter (`--metrics-listen HOST:PORT`).

Each process builds one `ProcessMetrics` (or a part's subclass of it, which adds that part's
metrics) on its own `CollectorRegistry`, never the global one, so tests can run several servers in
one interpreter. Metrics are recorded whether or not they are exported; `export` starts the HTTP
endpoint (`/metrics`). Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

import argparse
from typing import Callable, Iterator

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

log = structlog.get_logger(__name__)

# micro-batch compute, queue waits and solves: 1 ms .. ~2 min
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def metrics_address(text: str) -> str:
    """argparse type of --metrics-listen: '' (off) or HOST:PORT (port 0 picks a free one)."""
    if text == "":
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:9150; port 0 picks a free one)")
    return text


def add_metrics_flag(parser: argparse.ArgumentParser) -> None:
    """The same --metrics-listen flag on every server process."""
    parser.add_argument("--metrics-listen", type=metrics_address, default="", metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (port 0 picks a free one; "
                             "default: off)")


def short_method(full: str) -> str:
    """'/pqmesh.stage.v1.StageService/Forward' -> 'StageService/Forward'."""
    service, _, method = full.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{method}"


class ProcessMetrics:
    """One process's registry, its RPC error counter and (after `export`) its HTTP exporter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.rpc_errors = self.counter("pqmesh_rpc_errors_total", "RPCs that ended with a status other than OK",
                                       ("method", "code"))
        self.port: int | None = None
        self._httpd = None

    # -- helpers: metrics on this process's registry -------------------------------------------------
    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def gauge_of(self, name: str, doc: str, read: Callable[[], float]) -> Gauge:
        """A gauge read at scrape time from ``read`` (must be cheap and must not block)."""
        gauge = self.gauge(name, doc)
        gauge.set_function(read)
        return gauge

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = SECONDS_BUCKETS) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    # -- gRPC ---------------------------------------------------------------------------------------
    def interceptor(self) -> grpc.ServerInterceptor:
        """Counts every RPC of the server that ends with a non-OK status in ``pqmesh_rpc_errors_total``."""
        return _ErrorCounting(self.rpc_errors)

    # -- HTTP exporter ------------------------------------------------------------------------------
    def export(self, address: str) -> int:
        """Serves /metrics on ``address`` (HOST:PORT, port 0 picks one); returns and logs the bound port."""
        host, _, port = metrics_address(address).rpartition(":")
        self._httpd, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        self.port = self._httpd.server_port
        log.info("metrics_serving", address=address, port=self.port, path="/metrics")
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _ErrorCounting(grpc.ServerInterceptor):
    """Wraps each handler: after it ends, a status set by `context.abort`/`set_code` other than OK is
    counted under that code; an exception that escaped without a status counts as UNKNOWN (what gRPC
    sends for it). Our servicers turn unexpected exceptions into INTERNAL, so those count as INTERNAL."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = short_method(handler_call_details.method)
        for kind, make in _KINDS.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
                return make(wrap(behavior, method), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    def _record(self, method: str, context, raised: bool) -> None:
        code = context.code()
        if code is None and raised:
            code = grpc.StatusCode.UNKNOWN
        if code is not None and code != grpc.StatusCode.OK:
            self._counter.labels(method=method, code=code.name).inc()

    def _wrap_unary(self, behavior, method: str):
        def call(request, context):
            try:
                reply = behavior(request, context)
            except Exception:
                self._record(method, context, raised=True)
                raise
            self._record(method, context, raised=False)
            return reply
        return call

    def _wrap_stream(self, behavior, method: str):
        def call(request, context) -> Iterator:
            try:
                yield from behavior(request, context)
            except Exception:
                self._record(method, context, raised=True)
                raise
            self._record(method, context, raised=False)
        return call


_KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
