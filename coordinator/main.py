"""`pqmesh-coordinator`: bring the mesh up, resume unfinished jobs, serve the job API until SIGTERM.

The mesh is brought up before the API opens, so a coordinator that cannot load its plan exits
with the stage's reason (systemd restarts it) instead of accepting jobs it cannot run.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

import grpc
import structlog

from coordinator.config import CoordinatorConfig
from coordinator.engine import Engine, EngineSettings
from coordinator.jobs import JobService, Limits
from coordinator.mesh import Mesh, MeshSpec
from coordinator.metrics import CoordinatorMetrics
from coordinator.prediction import add_gauges
from coordinator.progress import ProgressBoard
from coordinator.scheduler import Scheduler
from coordinator.servicer import SERVICE_NAME, CoordinatorServicer
from coordinator.store import JobStore
from coordinator.text import TextCodec, has_tokenizer, read_model_facts
from pqmesh.api.coordinator.v1 import coordinator_pb2_grpc
from pqmesh.errors import PqmeshError
from pqmesh.grpc_server import create_server
from pqmesh.log import configure
from pqmesh.security import server_interceptors

log = structlog.get_logger(__name__)
GRACE_S = 5.0
UNARY_THREADS = 32  # on top of one thread per allowed WatchJob stream (each holds one while it is open)


@dataclass
class Coordinator:
    """A running coordinator: its server, bound port and parts (tests use them directly)."""

    server: grpc.Server
    port: int
    jobs: JobService
    engine: Engine
    mesh: Mesh
    store: JobStore
    health: object
    metrics: CoordinatorMetrics | None = None  # .port: the exporter's, with --metrics-listen

    def stop(self, grace: float | None = GRACE_S) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.mesh.close()
        self.store.close()


def _text_codec(config: CoordinatorConfig) -> TextCodec | None:
    directory = config.tokenizer or (config.model_dir if has_tokenizer(config.model_dir) else None)
    return TextCodec(directory) if directory is not None else None


def serve(config: CoordinatorConfig, metrics: CoordinatorMetrics | None = None) -> Coordinator:
    """Brings the mesh up, resumes stored jobs and starts serving (and the metrics exporter with
    --metrics-listen); returns the running coordinator."""
    metrics = metrics or CoordinatorMetrics()
    facts = read_model_facts(config.model_dir)
    if facts.num_layers is not None:
        config.plan.check_layers(facts.num_layers)
    codec = _text_codec(config)
    eos_ids = frozenset(config.eos_token_ids) or facts.eos_ids or (codec.eos_ids if codec else frozenset())
    spec = MeshSpec(config.plan, config.model_id, config.max_sequences, config.max_tokens_per_sequence, config.dtype)
    store = JobStore(config.state_dir)
    mesh = Mesh(spec, config.stage_credentials)
    try:
        mesh.bring_up(config.connect_timeout)
    except BaseException:
        mesh.close()
        store.close()
        raise
    plan = config.plan
    scheduler = Scheduler(config.max_sequences, config.max_tokens_per_sequence, plan.prefill_micro_batch,
                          plan.decode_micro_batch, config.in_flight)
    board = ProgressBoard()
    engine = Engine(store, mesh, scheduler, board, EngineSettings(
        eos_ids, connect_timeout=config.connect_timeout, step_timeout=config.step_timeout,
        recovery_timeout=config.stage_recovery_timeout, health_interval=config.health_interval),
                    codec.decode if codec else None, metrics=metrics)
    metrics.watch(scheduler, store)
    add_gauges(metrics, board)
    if config.metrics_listen:
        metrics.export(config.metrics_listen)
    jobs = JobService(store, engine, board, config.max_tokens_per_sequence, facts.vocab_size, codec, eos_ids,
                      Limits(config.max_pending_jobs, config.max_prompts_per_job, config.max_watchers))
    engine.start()
    server, port, health = create_server(
        config.listen, [(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, CoordinatorServicer(jobs),
                         SERVICE_NAME)], max_workers=config.max_watchers + UNARY_THREADS,
        credentials=config.credentials, interceptors=[metrics.interceptor(), *server_interceptors(config.credentials)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    log.info("coordinator_serving", port=port, plan_id=mesh.plan_id, stages=len(plan.stages),
             state_db=str(store.path), tokenizer=str(codec.directory) if codec else None, eos_ids=sorted(eos_ids))
    return Coordinator(server, port, jobs, engine, mesh, store, health, metrics)


def main(argv: list[str] | None = None) -> int:
    config = CoordinatorConfig.from_args(argv)
    configure(config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        coordinator = serve(config)
    except PqmeshError as err:
        log.error("coordinator_start_failed", error=str(err))
        sys.stderr.write(f"pqmesh-coordinator: {err}\n")
        return 1
    stop.wait()
    log.info("coordinator_stopping", grace_s=GRACE_S)
    coordinator.stop()
    log.info("coordinator_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
