"""Re-planning onto the devices that remain: the coordinator's client of the planner.

The operator gives the coordinator the `PlanRequest` its plan came from (``--replan-request``, the
proto3 JSON of `pqmesh.planner.v1.PlanRequest`) with every device it may use listed once by name
(`ClusterDevice.name`, count 1; spares included), and the address of each device's stage server
(``--device-address NAME=HOST:PORT``). When a stage stays unreachable past ``--replan-after``, the
engine asks `Replanner.plan` for a plan over the same model, workload and quality setting without the
lost devices; the planner answers from its registered profiles, or says which device is short of
what. The chosen plan is kept in the state directory (`PlanFile`), so a coordinator restarted during
or after a re-plan runs the plan it had switched to, not the one it was started with.

The other way (`coordinator.rejoin`, ``ReplanMesh``): lost devices whose stages are back, and devices
added while running (`AddedDevice`, kept in the plan file too), join by a plan over them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from google.protobuf import json_format

from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.grpc_server import channel
from pqmesh.plan import PipelinePlan
from pqmesh.security import Credentials

log = structlog.get_logger(__name__)

PLAN_TIMEOUT_S = 120.0


def parse_device_address(text: str) -> tuple[str, str]:
    """``NAME=HOST:PORT`` -> (name, address)."""
    name, sep, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if not sep or not name or not host or not port.isdigit():
        raise InvalidArgument(f"--device-address {text!r} must be NAME=HOST:PORT (a device of --replan-request)")
    return name, address


def read_plan_request(path: Path, addresses: dict[str, str]) -> planner_pb2.PlanRequest:
    """The re-plan request: every device named once, with count 1, and an address for each."""
    try:
        request = json_format.Parse(Path(path).read_text(), planner_pb2.PlanRequest())
    except OSError as err:
        raise InvalidArgument(f"cannot read --replan-request {path}: {err.strerror}") from None
    except json_format.ParseError as err:
        raise InvalidArgument(f"--replan-request {path} is not a pqmesh.planner.v1.PlanRequest: {err}") from None
    names = [d.name for d in request.devices]
    if not names or any(not n for n in names) or any(d.count > 1 for d in request.devices):
        raise InvalidArgument(f"--replan-request {path}: list every device once, with a name and count 1")
    missing = sorted(set(names) - set(addresses))
    if missing:
        raise InvalidArgument(f"devices {missing} of --replan-request have no --device-address NAME=HOST:PORT")
    return request


@dataclass(frozen=True)
class AddedDevice:
    """A device joined while running: its name (unique), stage address and planner device type."""

    name: str
    address: str
    device_type: str

    def cluster_device(self) -> planner_pb2.ClusterDevice:
        return planner_pb2.ClusterDevice(device_type=self.device_type, count=1, name=self.name, host=self.name)

    def to_json_obj(self) -> dict:
        return {"name": self.name, "address": self.address, "device_type": self.device_type}


@dataclass
class Replanner:
    """Asks the planner for a plan without the lost devices and places it on their stages' addresses."""

    planner: str  # HOST:PORT
    request: planner_pb2.PlanRequest
    addresses: dict[str, str]  # device name -> stage address
    credentials: Credentials | None = None
    lost: set[str] = field(default_factory=set)
    added: list[AddedDevice] = field(default_factory=list)  # devices joined after start (in request/addresses)

    @property
    def devices(self) -> list[str]:
        """Every device the coordinator may plan onto, lost ones included, in request order."""
        return [d.name for d in self.request.devices]

    def add(self, device: AddedDevice) -> None:
        """Makes ``device`` one of the request's devices from now on."""
        if device.name not in self.addresses:
            self.request.devices.append(device.cluster_device())
            self.addresses[device.name] = device.address
            self.added.append(device)

    def plan_without(self, device: str) -> PipelinePlan:
        """A plan over every device but ``device`` and those lost before; FailedPrecondition with the
        planner's own reason when nothing fits."""
        self.lost.add(device)
        return self.plan_over(self.lost)

    def plan_over(self, lost: set[str], extra: tuple[AddedDevice, ...] = (), event: str = "replanned",
                  workload: planner_pb2.Workload | None = None) -> PipelinePlan:
        """A plan over every device but ``lost`` (plus ``extra``, not added yet) for ``workload`` (default:
        the request's), placed on the devices' stage addresses; changes nothing here. FailedPrecondition
        with the planner's reason when nothing fits."""
        request = planner_pb2.PlanRequest()
        request.CopyFrom(self.request)
        if workload is not None:
            request.workload.CopyFrom(workload)
        del request.devices[:]
        request.devices.extend(d for d in self.request.devices if d.name not in lost)
        request.devices.extend(e.cluster_device() for e in extra)
        if not request.devices:
            raise FailedPrecondition(f"no device is left to re-plan onto (lost: {sorted(lost)})")
        what = f"re-planning without {sorted(lost)}" if lost else "planning over every device"
        with channel(self.planner, self.credentials) as ch:
            try:
                reply = planner_pb2_grpc.PlannerServiceStub(ch).Plan(request, timeout=PLAN_TIMEOUT_S)
            except grpc.RpcError as err:
                raise FailedPrecondition(f"{what} failed: the planner answered "
                                         f"{err.code().name}: {err.details()}") from None
        addresses = self.addresses | {e.name: e.address for e in extra}
        plan = PipelinePlan.from_proto(reply.plan)
        placed = plan.with_addresses([addresses[_name(s.device, addresses)] for s in plan.stages])
        log.info(event, lost=sorted(lost), added=[e.name for e in extra], plan_id=placed.plan_id,
                 stages=[[s.device, s.start, s.end] for s in placed.stages],
                 predicted_tokens_per_s=round(reply.predicted.throughput_tokens_per_s, 2))
        return placed


def _name(label: str, addresses: dict[str, str]) -> str:
    """A stage's device label is the ClusterDevice name (count 1: no index)."""
    name = label if label in addresses else label.rpartition(":")[0]
    if name not in addresses:
        raise FailedPrecondition(f"the planner placed a stage on {label!r}, which has no --device-address")
    return name


@dataclass(frozen=True)
class PlanFile:
    """The plan a coordinator switched to, kept beside its job database (keyed by the plan it started
    from, so a new ``--plan`` is not overridden by an old re-plan)."""

    path: Path

    def save(self, base_plan_id: str, plan: PipelinePlan, lost: set[str], added: list[AddedDevice] = ()) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"base_plan_id": base_plan_id, "plan": plan.to_json_obj(), "lost": sorted(lost),
                                   "added": [d.to_json_obj() for d in added]}))
        tmp.replace(self.path)

    def load(self, base: PipelinePlan) -> tuple[PipelinePlan, set[str], list[AddedDevice]] | None:
        """The saved re-plan of ``base``, the devices lost by then and those added, or None."""
        if not self.path.is_file():
            return None
        data = json.loads(self.path.read_text())
        if data.get("base_plan_id") != base.plan_id:
            return None
        added = [AddedDevice(d["name"], d["address"], d["device_type"]) for d in data.get("added", ())]
        return PipelinePlan.from_json(json.dumps(data["plan"])), set(data.get("lost", ())), added


@dataclass
class Replanning:
    """What the engine needs to re-plan: the planner client, where the current plan is kept, the plan
    the coordinator was started with, and how long a stage may stay unreachable first."""

    replanner: Replanner
    plan_file: PlanFile
    base_plan_id: str
    after_s: float = 30.0

    def without(self, device: str) -> PipelinePlan:
        """A plan without ``device`` (and those lost before), kept in the plan file before it is used."""
        plan = self.replanner.plan_without(device)
        self.plan_file.save(self.base_plan_id, plan, self.replanner.lost, self.replanner.added)
        return plan

    def switch(self, plan: PipelinePlan, lost: set[str], added: AddedDevice | None) -> None:
        """Records a plan chosen by `coordinator.rejoin` (the devices now lost, one added) and keeps it."""
        if added is not None:
            self.replanner.add(added)
        self.replanner.lost = set(lost)
        self.plan_file.save(self.base_plan_id, plan, self.replanner.lost, self.replanner.added)

    def restore(self, saved: tuple[PipelinePlan, set[str], list[AddedDevice]]) -> PipelinePlan:
        """Takes back the lost and added devices of a saved plan (`PlanFile.load`); returns its plan."""
        plan, lost, added = saved
        for device in added:
            self.replanner.add(device)
        self.replanner.lost = lost
        return plan
