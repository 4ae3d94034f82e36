"""`pqmesh mesh replan`: ask a running coordinator to re-plan onto devices that are back or new.

    pqmesh mesh replan --coordinator HOST:PORT [--rejoin NAME ...] [--add NAME=HOST:PORT:TYPE]
                       [--force] [--dry-run] [--for-job JOB_ID]

Calls ``ReplanMesh`` (`coordinator.rejoin`): with neither ``--rejoin`` nor ``--add``, every device
the coordinator lost rejoins (with ``--for-job``: the devices in use are re-planned for that job's
own lengths, `coordinator.job_lengths`). Prints the current and the new plan's devices and predicted tokens/s,
and whether the coordinator switched; exit code 0 when it switched (or for a dry run), 1 when it did
not, 2 when it refused the request (the reason on stderr).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from coordinator.commands import DEFAULT_COORDINATOR
from coordinator.rejoin import parse_added
from pqmesh import security
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.errors import PqmeshError
from pqmesh.grpc_server import channel

TIMEOUT_S = 900.0  # planning, the safe point and the new mesh's bring-up


def add_parser(sub: argparse._SubParsersAction) -> None:
    mesh = sub.add_parser("mesh", help="change a running coordinator's mesh")
    actions = mesh.add_subparsers(dest="mesh_command", required=True, metavar="ACTION")
    replan = actions.add_parser("replan", help="re-plan onto lost devices that are back, or a new device")
    replan.add_argument("--coordinator", default=DEFAULT_COORDINATOR, metavar="HOST:PORT",
                        help=f"coordinator address (default {DEFAULT_COORDINATOR})")
    replan.add_argument("--rejoin", action="append", default=[], metavar="NAME",
                        help="a lost device (named as in the coordinator's --replan-request) whose stage server is "
                             "back; repeatable (default, with no --add: every lost device)")
    replan.add_argument("--add", type=_added, default=None, metavar="NAME=HOST:PORT:TYPE",
                        help="a new device: its name, stage server address and planner device type")
    replan.add_argument("--force", action="store_true", help="switch even if the new plan is not predicted faster")
    replan.add_argument("--dry-run", action="store_true", help="plan and predict only; change nothing")
    replan.add_argument("--for-job", default="", metavar="JOB_ID",
                        help="plan for this job's own prompt and generation lengths (its pending requests) on the "
                             "mesh's KV slots; with neither --rejoin nor --add, over the devices in use")
    security.add_flags(replan, server=False, peer="the coordinator")
    replan.set_defaults(func=_replan)


def _added(text: str):
    try:
        return parse_added(text)
    except PqmeshError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def request_of(args) -> coordinator_pb2.ReplanMeshRequest:
    request = coordinator_pb2.ReplanMeshRequest(rejoin=args.rejoin, force=args.force, dry_run=args.dry_run,
                                                for_job=args.for_job)
    if args.add is not None:
        request.add.CopyFrom(coordinator_pb2.MeshDevice(name=args.add.name, address=args.add.address,
                                                        device_type=args.add.device_type))
    return request


def _replan(args) -> int:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel(args.coordinator, security.from_args(args)))
    try:
        reply = stub.ReplanMesh(request_of(args), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        sys.stderr.write(f"pqmesh mesh replan: {err.code().name}: {err.details()}\n")
        return 2
    out = sys.stdout
    out.write(f"current plan {reply.old_plan_id}: {' -> '.join(reply.old_devices)}, "
              f"{reply.old_predicted_tokens_per_s:.1f} tokens/s predicted\n")
    out.write(f"new plan     {reply.new_plan_id}: {' -> '.join(reply.new_devices)}, "
              f"{reply.new_predicted_tokens_per_s:.1f} tokens/s predicted\n")
    out.write(("switched" if reply.switched else "not switched") + f": {reply.message}\n")
    return 0 if reply.switched or args.dry_run else 1
