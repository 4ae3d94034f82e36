"""`pqmesh-stage`: serve one pipeline stage until SIGTERM (systemd's stop) or Ctrl-C."""

from __future__ import annotations

import signal
import threading

import structlog
import torch

from pqmesh import capacity
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.cpuset import format_cpus, pin
from pqmesh.grpc_server import create_server
from pqmesh.log import configure
from pqmesh.security import server_interceptors
from stage_server.config import StageConfig
from stage_server.metrics import StageMetrics
from stage_server.runtime import StageRuntime
from stage_server.servicer import StageServicer

SERVICE_NAME = stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name


def default_budget(device: str) -> int:
    """The device's memory minus the reserve the planner assumes for it (`pqmesh.capacity`)."""
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return capacity.default_budget("cuda", int(total))
    return capacity.default_budget("cpu", capacity.physical_memory_bytes())


def serve(config: StageConfig, metrics: StageMetrics | None = None, worker_thread: bool = True):
    """Starts the server (and the metrics exporter with --metrics-listen); returns (server, port, servicer).

    ``metrics`` (default: new) records this stage's metrics; ``servicer.metrics.port`` is the exporter's.
    With ``worker_thread=False`` the caller must run ``servicer.worker.run()`` (the compute loop).
    """
    metrics = metrics or StageMetrics()
    runtime = StageRuntime(config.device, config.memory_budget or default_budget(config.device), config.model_root,
                           keep_unchanged=config.keep_shards)
    servicer = StageServicer(runtime, config.queue_depth, config.credentials, metrics, worker_thread)
    if config.metrics_listen:
        metrics.export(config.metrics_listen)
    server, port, _ = create_server(
        config.listen,
        [(stage_pb2_grpc.add_StageServiceServicer_to_server, servicer, SERVICE_NAME)],
        credentials=config.credentials,
        interceptors=[metrics.interceptor(), *server_interceptors(config.credentials, config.allowed_methods())],
    )
    return server, port, servicer


def main(argv: list[str] | None = None) -> int:
    config = StageConfig.from_args(argv)
    configure(config.log_level)
    if config.cpus:  # before any torch work: every thread torch starts inherits the affinity
        pin(config.cpus)
    if config.device.startswith("cuda"):  # this (main) thread loads and computes: let it own CUDA first
        torch.cuda.set_device(torch.device(config.device))
        torch.zeros(1, device=config.device)
    log = structlog.get_logger("pqmesh-stage")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before "stage_serving": a caller may stop us at once
        signal.signal(sig, lambda *_: stop.set())
    server, port, servicer = serve(config, worker_thread=False)
    log.info("stage_serving", port=port, device=config.device, budget=servicer.runtime.memory_budget,
             model_root=str(config.model_root), cpus=format_cpus(config.cpus) if config.cpus else "",
             threads=torch.get_num_threads())

    def shut_down() -> None:  # a helper thread: the main thread is busy computing
        stop.wait()
        log.info("stage_stopping")
        server.stop(grace=5).wait()
        servicer.worker.stop()

    threading.Thread(target=shut_down, name="stage-shutdown").start()
    servicer.worker.run()  # the compute loop, on the main thread, until shut_down stops it
    servicer.metrics.close()
    log.info("stage_stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
