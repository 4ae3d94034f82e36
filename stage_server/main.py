"""`pqmesh-stage`: serve one pipeline stage until SIGTERM (systemd's stop) or Ctrl-C."""

from __future__ import annotations

import signal
import threading

import structlog
import torch

from pqmesh.grpc_server import create_server
from pqmesh.log import configure
from pqmesh.stage.v1 import stage_pb2, stage_pb2_grpc
from stage_server.config import StageConfig, physical_memory_bytes
from stage_server.runtime import StageRuntime
from stage_server.servicer import StageServicer

SERVICE_NAME = stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name


def default_budget(device: str) -> int:
    """90% of the GPU's memory, or 80% of the host's RAM for a CPU stage."""
    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
    return int(physical_memory_bytes() * 0.8)


def serve(config: StageConfig):
    """Starts the server; returns (server, port, servicer)."""
    runtime = StageRuntime(config.device, config.memory_budget or default_budget(config.device), config.model_root)
    servicer = StageServicer(runtime, config.queue_depth)
    server, port, _ = create_server(config.listen, [(stage_pb2_grpc.add_StageServiceServicer_to_server, servicer, SERVICE_NAME)])
    return server, port, servicer


def main(argv: list[str] | None = None) -> int:
    config = StageConfig.from_args(argv)
    configure(config.log_level)
    log = structlog.get_logger("pqmesh-stage")
    server, port, servicer = serve(config)
    log.info("stage_serving", port=port, device=config.device, budget=servicer.runtime.memory_budget,
             model_root=str(config.model_root))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stage_stopping")
    server.stop(grace=5).wait()
    servicer.worker.stop()
    return 0
