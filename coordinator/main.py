"""`pqmesh-coordinator`: bring the mesh up, resume unfinished jobs, serve the job API until SIGTERM.

The mesh is brought up before the API opens, so a coordinator that cannot load its plan exits
with the stage's reason (systemd restarts it) instead of accepting jobs it cannot run.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, replace

import grpc
import structlog

from coordinator.config import CoordinatorConfig
from coordinator.engine import Engine, EngineSettings
from coordinator.jobs import JobService, Limits
from coordinator.mesh import Mesh, MeshSpec, StageUnavailable
from coordinator.metrics import CoordinatorMetrics
from coordinator.prediction import add_gauges
from coordinator.progress import ProgressBoard
from coordinator.rejoin import MeshChange, probe
from coordinator.rejoin_watch import RejoinWatch
from coordinator.replan import PlanFile, Replanner, Replanning, read_plan_request
from coordinator.resolve import Resolver, served_names
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
    rejoin: RejoinWatch | None = None  # with --rejoin-interval

    def stop(self, grace: float | None = GRACE_S) -> None:
        if self.rejoin is not None:
            self.rejoin.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.engine.mesh.close()  # the mesh of the current plan (a re-plan replaces the first one)
        self.store.close()


def _text_codec(config: CoordinatorConfig) -> TextCodec | None:
    directory = config.tokenizer or (config.model_dir if has_tokenizer(config.model_dir) else None)
    return TextCodec(directory) if directory is not None else None


def _replanning(config: CoordinatorConfig) -> Replanning | None:
    if not config.planner:
        return None
    addresses = dict(config.device_addresses)
    request = read_plan_request(config.replan_request, addresses)
    replanner = Replanner(config.planner, request, addresses)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return Replanning(replanner, PlanFile(config.state_dir / "replanned_plan.json"), config.plan.plan_id,
                      config.replan_after)


def _bring_up(spec: MeshSpec, config: CoordinatorConfig, replanning: Replanning | None) -> Mesh:
    """The mesh of ``spec``, brought up; with re-planning configured, a stage that does not answer at
    start (a coordinator restarted during a re-plan) is planned around like one lost while running."""
    while True:
        mesh = Mesh(spec, config.stage_credentials)
        try:
            mesh.bring_up(config.connect_timeout)
            return mesh
        except StageUnavailable as err:
            mesh.close()
            if replanning is None or err.index is None:
                raise
            spec = replace(spec, plan=replanning.without(spec.plan.stages[err.index].device))
        except BaseException:
            mesh.close()
            raise


def serve(config: CoordinatorConfig, metrics: CoordinatorMetrics | None = None) -> Coordinator:
    """Brings the mesh up, resumes stored jobs and starts serving (and the metrics exporter with
    --metrics-listen); returns the running coordinator."""
    metrics = metrics or CoordinatorMetrics()
    facts = read_model_facts(config.model_dir)
    if facts.num_layers is not None:
        config.plan.check_layers(facts.num_layers)
    codec = _text_codec(config)
    eos_ids = frozenset(config.eos_token_ids) or facts.eos_ids or (codec.eos_ids if codec else frozenset())
    replanning = _replanning(config)
    plan = config.plan
    if replanning is not None and (saved := replanning.plan_file.load(config.plan)) is not None:
        plan = replanning.restore(saved)
        log.warning("plan_from_replan", plan_id=plan.plan_id, lost=sorted(replanning.replanner.lost),
                    added=[d.name for d in replanning.replanner.added], path=str(replanning.plan_file.path))
    spec = MeshSpec(plan, config.model_id, config.max_sequences, config.max_tokens_per_sequence, config.dtype)
    store = JobStore(config.state_dir)
    try:
        mesh = _bring_up(spec, config, replanning)
    except BaseException:
        store.close()
        raise
    plan = mesh.spec.plan
    scheduler = Scheduler(config.max_sequences, config.max_tokens_per_sequence, plan.prefill_micro_batch,
                          plan.decode_micro_batch, config.max_in_flight or len(plan.stages),
                          config.prefill_length_window)
    board = ProgressBoard()
    resolver = Resolver(config.max_tokens_per_sequence, codec, facts.vocab_size, eos_ids,
                        served_names(config.model_id, config.model_dir), config.model_id)
    engine = Engine(store, mesh, scheduler, board, EngineSettings(
        eos_ids, connect_timeout=config.connect_timeout, step_timeout=config.step_timeout,
        recovery_timeout=config.stage_recovery_timeout, health_interval=config.health_interval,
        feed_window=max(config.feed_window, 2 * config.max_sequences),
        release_in_band=config.release_mode == "in-band"),
                    codec.decode if codec else None, metrics=metrics, resolver=resolver, replanning=replanning)
    metrics.watch(scheduler, store)
    add_gauges(metrics, board)
    if config.metrics_listen:
        metrics.export(config.metrics_listen)
    jobs = JobService(store, engine, board, config.max_tokens_per_sequence, facts.vocab_size, codec, eos_ids,
                      Limits(config.max_pending_jobs, config.max_prompts_per_job, config.max_watchers,
                             config.max_prompt_bytes))
    engine.start()
    server, port, health = create_server(
        config.listen, [(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, CoordinatorServicer(jobs),
                         SERVICE_NAME)], max_workers=config.max_watchers + UNARY_THREADS,
        credentials=config.credentials, interceptors=[metrics.interceptor(), *server_interceptors(config.credentials)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    log.info("coordinator_serving", port=port, plan_id=mesh.plan_id, stages=len(plan.stages),
             state_db=str(store.path), tokenizer=str(codec.directory) if codec else None, eos_ids=sorted(eos_ids))
    rejoin = _rejoin_watch(config, engine)
    return Coordinator(server, port, jobs, engine, mesh, store, health, metrics, rejoin)


def _rejoin_watch(config: CoordinatorConfig, engine: Engine) -> RejoinWatch | None:
    """With --rejoin-interval: the thread that re-plans with lost devices that answer again."""
    replanning = engine.replanning
    if replanning is None or config.rejoin_interval <= 0:
        return None

    def answers(name: str) -> bool:
        try:
            probe(name, replanning.replanner.addresses[name], config.stage_credentials)
            return True
        except PqmeshError:
            return False

    watch = RejoinWatch(lambda: set(replanning.replanner.lost), answers,
                        lambda names: engine.replan_mesh(MeshChange(rejoin=names)), config.rejoin_interval)
    watch.start()
    return watch


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
