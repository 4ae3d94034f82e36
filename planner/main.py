"""`pqmesh-planner`: the PlannerService process (systemd runs it with --listen and --state-dir).

Serves until SIGTERM or SIGINT, then reports NOT_SERVING on the health service and stops gracefully
(in-flight calls get a grace period).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from planner.metrics import PlannerMetrics
from planner.registry import ProfileRegistry
from planner.service import SERVICE_NAME, PlannerServicer
from pqmesh import security
from pqmesh.api.planner.v1 import planner_pb2_grpc
from pqmesh.errors import PqmeshError
from pqmesh.grpc_server import create_server
from pqmesh.log import configure
from pqmesh.metrics import add_metrics_flag

log = structlog.get_logger(__name__)
GRACE_S = 5.0


@dataclass(frozen=True)
class PlannerConfig:
    listen: str
    state_dir: Path
    log_level: str = "info"
    credentials: security.Credentials | None = None
    metrics_listen: str = ""  # HOST:PORT of the Prometheus exporter; "" = off

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--listen must be HOST:PORT (port 0 picks a free one), got {self.listen!r}")


def parse_args(argv: list[str] | None = None) -> PlannerConfig:
    parser = argparse.ArgumentParser(prog="pqmesh-planner", description="Serve the LLM-PQ planner over gRPC.")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on, e.g. 0.0.0.0:50050")
    parser.add_argument("--state-dir", required=True, type=Path, help="directory of the device-profile database")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error (default: info)")
    add_metrics_flag(parser)
    security.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        return PlannerConfig(args.listen, args.state_dir, args.log_level,
                             credentials=security.from_args(args).require_server(),
                             metrics_listen=args.metrics_listen)
    except (ValueError, PqmeshError) as err:
        parser.error(str(err))


def start(config: PlannerConfig, metrics: PlannerMetrics | None = None):
    """Open the registry and start serving (and the metrics exporter with --metrics-listen); returns
    (server, port, health servicer). Pass ``metrics`` to read them (``metrics.port``: the exporter's)."""
    metrics = metrics or PlannerMetrics()
    registry = ProfileRegistry(config.state_dir)
    servicer = PlannerServicer(registry, metrics)
    if config.metrics_listen:
        metrics.export(config.metrics_listen)
    return create_server(
        config.listen,
        [(planner_pb2_grpc.add_PlannerServiceServicer_to_server, servicer, SERVICE_NAME)],
        credentials=config.credentials,
        interceptors=[metrics.interceptor(), *security.server_interceptors(config.credentials)],
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure(config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    metrics = PlannerMetrics()
    server, port, health = start(config, metrics)
    log.info("planner_serving", listen=config.listen, port=port, state_dir=str(config.state_dir))
    stop.wait()
    log.info("planner_stopping", grace_s=GRACE_S)
    health.enter_graceful_shutdown()
    server.stop(GRACE_S).wait()
    metrics.close()
    log.info("planner_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
