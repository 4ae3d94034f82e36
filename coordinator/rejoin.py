"""Rejoin: re-plan onto more devices at a safe point (``ReplanMesh``, ``pqmesh mesh replan``).

A device lost before whose stage server is back, or a device added while running, joins the mesh by
a re-plan over every usable device. `propose` (on the caller's thread: it waits on the planner and
the stages) checks the request, asks the new device's stage server whether it answers, gets the
planner's plan (`coordinator.replan.Replanner.plan_over`) and predicts both plans' tokens/s by
replaying each plan's own cost model over the workload of ``--replan-request`` (`pqmesh.mesh_sim`).
Unless ``force``, the coordinator switches only to a plan predicted to be faster.

`MeshChanges` (a mixin of `coordinator.engine.Engine`) does the switch on the engine thread: it stops
scheduling new micro-batches, waits until every one in flight has answered (the safe point), then
pauses the pipeline as for an outage (running sequences wait to be prefilled again from prompt +
generated tokens), keeps the new plan in the plan file, switches mesh and brings it up. A failure
afterwards is an ordinary outage: the recovery and re-plan paths of `coordinator.recovery` apply.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import structlog

from coordinator.job_lengths import job_workload
from coordinator.replan import AddedDevice, Replanner, parse_device_address
from pqmesh.api.coordinator.v1 import coordinator_pb2
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, PqmeshError, Unavailable
from pqmesh.lengths import job_lengths
from pqmesh.mesh_sim import simulate
from pqmesh.plan import PipelinePlan
from pqmesh.stage_client import StageClient

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class MeshChange:
    """What a ReplanMesh call asks for."""

    rejoin: tuple[str, ...] = ()  # lost devices that are back; () with no ``add``: every lost device
    add: AddedDevice | None = None
    force: bool = False
    dry_run: bool = False
    for_job: str = ""  # plan for this job's own lengths (`coordinator.job_lengths`)

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.ReplanMeshRequest) -> MeshChange:
        add = None
        if msg.HasField("add"):
            add = AddedDevice(msg.add.name, msg.add.address, msg.add.device_type)
        return cls(tuple(msg.rejoin), add, msg.force, msg.dry_run, msg.for_job)


def parse_added(text: str) -> AddedDevice:
    """``NAME=HOST:PORT:TYPE`` (the CLI's --add) -> AddedDevice."""
    head, sep, device_type = text.rpartition(":")
    if not sep or not device_type or "=" not in head:
        raise InvalidArgument(f"--add {text!r} must be NAME=HOST:PORT:TYPE, e.g. gpu-7=10.0.0.7:50060:A100-80G")
    name, address = parse_device_address(head)
    return AddedDevice(name, address, device_type)


@dataclass(frozen=True)
class Proposal:
    """A plan over more devices, next to the current one."""

    mesh_plan_id: str  # the engine's mesh when this was planned: the switch is refused if it changed
    old_plan: PipelinePlan
    new_plan: PipelinePlan
    old_tokens_per_s: float
    new_tokens_per_s: float
    lost: frozenset[str]  # devices still lost after the change
    rejoined: tuple[str, ...]  # lost devices that rejoin, and the added one
    added: AddedDevice | None

    @property
    def better(self) -> bool:
        return self.new_tokens_per_s > self.old_tokens_per_s


@dataclass(frozen=True)
class Outcome:
    proposal: Proposal
    switched: bool
    message: str

    def to_proto(self) -> coordinator_pb2.ReplanMeshResponse:
        p = self.proposal
        return coordinator_pb2.ReplanMeshResponse(
            switched=self.switched, old_plan_id=p.old_plan.plan_id, new_plan_id=p.new_plan.plan_id,
            old_predicted_tokens_per_s=p.old_tokens_per_s, new_predicted_tokens_per_s=p.new_tokens_per_s,
            old_devices=[s.device for s in p.old_plan.stages], new_devices=[s.device for s in p.new_plan.stages],
            rejoined=list(p.rejoined) if self.switched else [], message=self.message)


def joining(change: MeshChange, replanner: Replanner) -> tuple[str, ...]:
    """The lost devices that rejoin; InvalidArgument / FailedPrecondition / AlreadyExists saying what to change."""
    known, lost = replanner.devices, replanner.lost
    unknown = [n for n in change.rejoin if n not in known]
    if unknown:
        raise InvalidArgument(f"devices {unknown} are not devices of --replan-request (those are {known}); "
                              "name lost ones, or add a new device with --add NAME=HOST:PORT:TYPE")
    in_use = [n for n in change.rejoin if n not in lost]
    if in_use:
        raise FailedPrecondition(f"devices {in_use} are not lost (lost: {sorted(lost) or 'none'}); only a lost "
                                 "device can rejoin")
    if change.add is not None:
        add = change.add
        if not add.name or not add.device_type:
            raise InvalidArgument("an added device needs a name and a device_type (a registered profile's "
                                  "device_type or a built-in type)")
        parse_device_address(f"{add.name}={add.address}")
        if add.name in known:
            hint = f"rejoin {add.name} instead" if add.name in lost else "pick another name"
            raise AlreadyExists(f"device {add.name!r} is already a device of --replan-request; {hint}")
    rejoin = change.rejoin or (() if change.add is not None or change.for_job else tuple(sorted(lost)))
    if not rejoin and change.add is None and not change.for_job:
        raise FailedPrecondition("no device is lost and none is added: nothing to rejoin; add a device with "
                                 "--add NAME=HOST:PORT:TYPE")
    return rejoin


def probe(name: str, address: str, credentials) -> None:
    """Unavailable unless the stage server at ``address`` answers GetInfo."""
    client = StageClient(address, credentials)
    try:
        client.info(timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as err:
        raise Unavailable(f"the stage server of {name} at {address} does not answer ({err.code().name}: "
                          f"{err.details()}); start it (pqmesh-stage --listen {address}), then try again") from None
    finally:
        client.close()


def predicted_tokens_per_s(plan: PipelinePlan, workload: planner_pb2.Workload, max_sequences: int) -> float:
    """Tokens/s of ``plan``'s cost model replayed over ``workload`` (--replan-request's, or a job's own
    lengths); 0 without a cost."""
    if plan.cost is None:
        return 0.0
    prompts, new_tokens = job_lengths(workload)
    seconds = simulate(plan.cost, prompts, new_tokens, max_sequences,
                       plan.prefill_micro_batch, plan.decode_micro_batch).job_s
    return sum(new_tokens) / seconds if seconds > 0 else 0.0


def propose(change: MeshChange, replanner: Replanner, current: PipelinePlan, mesh_plan_id: str, credentials,
            max_sequences: int, workload: planner_pb2.Workload | None = None) -> Proposal:
    """Checks ``change``, probes the joining stages, plans over the devices it leaves usable for
    ``workload`` (default: --replan-request's) and predicts both plans on it; changes nothing (the engine
    applies the proposal at the safe point)."""
    rejoin = joining(change, replanner)
    for name in rejoin:
        probe(name, replanner.addresses[name], credentials)
    if change.add is not None:
        probe(change.add.name, change.add.address, credentials)
    lost = set(replanner.lost) - set(rejoin)
    extra = (change.add,) if change.add is not None else ()
    plan = replanner.plan_over(lost, extra, event="mesh_change_planned", workload=workload)
    workload = workload if workload is not None else replanner.request.workload
    old, new = (predicted_tokens_per_s(p, workload, max_sequences) for p in (current, plan))
    return Proposal(mesh_plan_id, current, plan, old, new, frozenset(lost),
                    rejoin + tuple(e.name for e in extra), change.add)


class _Pending:
    """A switch handed to the engine thread, and its answer."""

    def __init__(self, proposal: Proposal) -> None:
        self.proposal = proposal
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.error: PqmeshError | None = None

    def finish(self, outcome: Outcome | None = None, error: PqmeshError | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


class MeshChanges:
    """ReplanMesh on the engine, mixed into `coordinator.engine.Engine` with `coordinator.recovery.OutageHandling`.

    ``replan_mesh`` runs on the caller's thread; the switch itself on the engine thread, where the loop
    calls ``_mesh_change_step`` after every event while ``_change`` waits and schedules nothing new.
    """

    def _init_mesh_changes(self) -> None:
        self._change: _Pending | None = None  # a switch waiting for the safe point (engine thread)
        self._change_lock = threading.Lock()  # one ReplanMesh at a time

    def replan_mesh(self, change: MeshChange, timeout: float = 600.0) -> Outcome:
        """Plans over the devices ``change`` asks for; switches at the next safe point when the plan is
        predicted to be faster (or ``force``), unless ``dry_run``. Called from a gRPC thread."""
        if self.replanning is None:
            raise FailedPrecondition("this coordinator was started without --planner and --replan-request, so it "
                                     "cannot re-plan; restart it with both (and --device-address for every device)")
        if not self._change_lock.acquire(blocking=False):
            raise Aborted("another ReplanMesh is in progress; try again once it has answered")
        try:
            outage = self._outage
            if outage is not None or not self._mesh_ok:
                why = outage.reason if outage is not None else "down"
                raise Unavailable(f"the mesh is recovering from an outage ({why}); try again once it is back")
            mesh = self.mesh
            workload = None
            if change.for_job:
                workload = job_workload(self.store, self.feeder.resolver, change.for_job,
                                        self.scheduler.max_sequences, self.scheduler.max_tokens)
            proposal = propose(change, self.replanning.replanner, mesh.spec.plan, mesh.plan_id, mesh.credentials,
                               self.scheduler.max_sequences, workload)
            rates = f"{proposal.old_tokens_per_s:.1f} -> {proposal.new_tokens_per_s:.1f} tokens/s predicted"
            if change.dry_run:
                return Outcome(proposal, False, f"dry run: {rates}; nothing changed")
            if not (proposal.better or change.force):
                return Outcome(proposal, False, f"not switched: the new plan is not predicted to be faster ({rates}); "
                                                "pass force to switch anyway")
            pending = _Pending(proposal)
            self._events.put(("mesh_change", pending))
            if not pending.done.wait(timeout):
                raise Unavailable(f"the mesh did not reach a safe point within {timeout:.0f} s; the switch is still "
                                  "pending (see the coordinator's log: mesh_change_switched)")
            if pending.error is not None:
                raise pending.error
            return pending.outcome
        finally:
            self._change_lock.release()

    # -- the engine thread ------------------------------------------------------------------------------
    def _on_mesh_change(self, pending: _Pending) -> None:
        self._change = pending
        log.info("mesh_change_draining", in_flight=len(self.scheduler.in_flight),
                 new_plan_id=pending.proposal.new_plan.plan_id)

    def _mesh_change_step(self) -> None:
        """Refuses the waiting switch if the mesh failed or changed meanwhile; switches once nothing is in flight."""
        pending = self._change
        if not self._mesh_ok or self._outage is not None:
            self._change = None
            pending.finish(error=Unavailable("a stage failed while the mesh drained for the re-plan; try again once "
                                             "the mesh is back"))
        elif self.mesh.plan_id != pending.proposal.mesh_plan_id:
            self._change = None
            pending.finish(error=Aborted("the mesh was re-planned while this request was planned; run it again"))
        elif not self.scheduler.in_flight:
            self._change = None
            self._switch_to(pending)

    def _switch_to(self, pending: _Pending) -> None:
        proposal = pending.proposal
        try:
            self._pause(f"re-planning onto {list(proposal.rejoined)} (ReplanMesh)", blame=False)
            self.replanning.switch(proposal.new_plan, set(proposal.lost), proposal.added)
            self._switch_mesh(proposal.new_plan)
            self._outage.replans += 1
            self._try_bring_up()
        except Exception as err:  # noqa: BLE001 - answer the caller, then let the engine loop recover
            pending.finish(error=err if isinstance(err, PqmeshError) else Unavailable(
                f"switching to the new plan failed ({type(err).__name__}: {err}); the coordinator recovers the mesh"))
            raise
        up = "the new mesh is up" if self._mesh_ok else (
            f"the new mesh is not up yet ({self._outage.last_error}); the coordinator keeps trying")
        log.warning("mesh_change_switched", rejoined=list(proposal.rejoined), plan_id=self.mesh.plan_id,
                    devices=[s.device for s in proposal.new_plan.stages], up=self._mesh_ok)
        pending.finish(Outcome(proposal, True, f"switched ({proposal.old_tokens_per_s:.1f} -> "
                                                f"{proposal.new_tokens_per_s:.1f} tokens/s predicted); {up}"))
