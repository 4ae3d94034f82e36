"""`pqmesh profile`: measure this device for the planner.

    pqmesh profile --model NAME_OR_DIR --device cpu|cuda:N --bits 16,8,4,3 --out PROFILE.json
                   [--name NAME] [--memory-bytes N] [--register PLANNER_ADDR] [--quick] [--cache-dir DIR]
    pqmesh profile validate PROFILE.json [--points N] [--json]
    pqmesh profile link --out LINK.json [--target HOST:PORT]     (or: --serve --listen HOST:PORT)

torch, transformers and gRPC are imported inside the handlers, so `pqmesh --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pqmesh import security
from pqmesh.errors import InvalidArgument, NotFound


def _grid_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny grid (tests, smoke checks)")
    p.add_argument("--prefill-batches", default="", help="comma list of prefill micro-batch sizes (overrides the grid)")
    p.add_argument("--prompt-lengths", default="", help="comma list of prompt lengths")
    p.add_argument("--decode-batches", default="", help="comma list of decode micro-batch sizes")
    p.add_argument("--contexts", default="", help="comma list of decode context lengths (cached + new)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="time decoder layers on this device and write a planner device profile")
    p.add_argument(
        "--model", help="built-in model name (e.g. opt-30b), smollm2-135m-instruct, config.json or checkpoint dir"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default: cpu)")
    p.add_argument("--bits", default="16,8,4,3", help="bitwidths to profile (default: 16,8,4,3)")
    p.add_argument("--out", type=Path, help="profile JSON to write (proto3 JSON of pqmesh.planner.v1.DeviceProfile)")
    p.add_argument("--name", default="", help="profile name (default: HOSTNAME-cpu or HOSTNAME-cudaN)")
    p.add_argument("--memory-bytes", type=int, default=0,
                   help="a stage's --memory-budget: what the planner may use on it, no reserve (default: the "
                        "device's total, with the reserve a stage leaves by default: pqmesh.capacity)")
    p.add_argument("--reserve-bytes", type=int, default=None,
                   help="bytes of --memory-bytes the planner leaves unused (default: 0 with --memory-bytes, "
                        "else 1 GiB of a GPU or 20%% of RAM)")
    p.add_argument("--cpus", default="",
                   help="profile pinned to these cores, e.g. 0-3, one torch thread each, as `pqmesh-stage --cpus` "
                        "runs: each pinned set is one device with its own profile")
    p.add_argument(
        "--register", default="", metavar="PLANNER_ADDR", help="also RegisterDevice with the planner at HOST:PORT"
    )
    p.add_argument(
        "--dtype", default="", help="float32, float16 or bfloat16 (default: float32 on CPU, float16 on CUDA)"
    )
    p.add_argument("--layers", type=int, default=2, help="decoder layers in the timed shard (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point, median counts (default: 3)")
    p.add_argument("--cache-dir", type=Path, help="measurement cache (default: ~/.cache/pqmesh/profiles)")
    p.add_argument("--no-cache", action="store_true", help="measure everything again and store nothing")
    _grid_flags(p)
    security.add_flags(p, server=False, peer="the planner of --register")
    p.set_defaults(func=run_profile)
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    v = actions.add_parser("validate", help="held-out error of a profile's latency models")
    v.add_argument("profile", type=Path, help="profile JSON written by pqmesh profile")
    v.add_argument("--points", type=int, default=6, help="held-out points per phase (default: 6)")
    v.add_argument("--model", default="", help="model to rebuild (default: from PROFILE.run.json)")
    v.add_argument("--device", default="", help="device (default: from PROFILE.run.json)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=run_validate)

    link = actions.add_parser("link", help="latency and bandwidth of the stage-to-stage gRPC hop")
    link.add_argument("--out", type=Path, help="link JSON to write")
    link.add_argument("--target", default="", help="HOST:PORT of a `pqmesh profile link --serve` (default: loopback)")
    link.add_argument("--serve", action="store_true", help="run a probe stage server until Ctrl-C")
    link.add_argument("--listen", default="0.0.0.0:50070", help="address for --serve (default: 0.0.0.0:50070)")
    link.add_argument("--repeats", type=int, default=5)
    link.set_defaults(func=run_link)


def _grid(args, device_kind: str):
    from profiler.grid import PRESETS, Grid, default_grid, parse_ints

    base = PRESETS["quick"] if args.quick else default_grid(device_kind)
    override = {name: parse_ints(getattr(args, name), "--" + name.replace("_", "-"))
                for name in ("prefill_batches", "prompt_lengths", "decode_batches", "contexts") if getattr(args, name)}
    if not override:
        return base
    return Grid(**{**{k: v for k, v in base.to_json().items() if k != "version"}, **override})


def _bits(text: str):
    from pqmesh.types import Bits

    values = [v for v in text.split(",") if v.strip()]
    if not values:
        raise InvalidArgument("--bits is empty; give e.g. 16,8,4,3")
    return tuple(sorted({Bits.parse(v) for v in values}, reverse=True))


def _cache(args):
    from profiler.cache import ProfileCache, default_cache_dir

    return ProfileCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))


def build_request(args):
    from profiler.run import ProfileRequest
    from profiler.target import parse_dtype, resolve_device, resolve_model
    from profiler.timing import TimingOptions

    bits = _bits(args.bits)
    cpus = _pin(args.cpus, args.device)
    device = resolve_device(args.device)
    model = resolve_model(args.model)
    options = TimingOptions(layers=args.layers, repeats=args.repeats)
    return ProfileRequest(model, device, parse_dtype(args.dtype, device), bits, _grid(args, device.kind), options,
                          args.name, args.memory_bytes, args.reserve_bytes, cpus)


def _pin(text: str, device: str) -> tuple[int, ...]:
    """Pins this process for --cpus (before torch starts its threads); the cores, or () unpinned."""
    from pqmesh.cpuset import parse_cpus, pin

    if not text:
        return ()
    if not device.strip().startswith("cpu"):
        raise InvalidArgument(f"--cpus pins a CPU profile; --device {device} is not a CPU")
    return pin(parse_cpus(text))


def register(address: str, device_profile, credentials=None) -> bool:
    """RegisterDevice at the planner `address`; True when it replaced a profile of that name."""
    import grpc

    from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
    from pqmesh.errors import Unavailable
    from pqmesh.grpc_server import channel

    with channel(address, credentials) as ch:
        stub = planner_pb2_grpc.PlannerServiceStub(ch)
        try:
            reply = stub.RegisterDevice(
                planner_pb2.RegisterDeviceRequest(profile=device_profile.to_proto()), timeout=30
            )
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"planner at {address} is unreachable ({err.details()}); check --register") from None
            raise InvalidArgument(
                f"planner at {address} refused the profile: {err.code().name}: {err.details()}"
            ) from None
    return reply.replaced


def run_profile(args) -> int:
    from profiler import run

    if args.action is None and (not args.model or not args.out):
        raise InvalidArgument("pqmesh profile needs --model and --out (or an action: validate, link)")
    request = build_request(args)
    device_profile, record = run.profile(request, _cache(args))
    run.write(device_profile, record, args.out)
    sys.stdout.write(f"wrote {args.out} ({device_profile.name}: {request.model.name} on {request.device.name}, "
                     f"bits {','.join(str(int(b)) for b in request.bits)}; cached bits {list(record.cache_hits)}, "
                     f"{record.seconds:.1f} s)\n")
    if args.register:
        replaced = register(args.register, device_profile, security.from_args(args))
        sys.stdout.write(f"registered {device_profile.name} with the planner at {args.register}"
                         f"{' (replaced)' if replaced else ''}\n")
    return 0


def run_validate(args) -> int:
    from planner.devices import DeviceProfile
    from profiler import validate
    from profiler.run import ProfileRequest, RunRecord, record_path
    from profiler.target import parse_dtype, resolve_device, resolve_model
    from profiler.timing import TimingOptions

    if not args.profile.is_file():
        raise NotFound(f"profile file {args.profile} does not exist")
    device_profile = DeviceProfile.from_json(args.profile.read_text())
    rec_path = record_path(args.profile)
    if not rec_path.is_file():
        raise NotFound(f"{rec_path} (written by pqmesh profile next to the profile) does not exist; reprofile")
    record = RunRecord.from_json(json.loads(rec_path.read_text()))
    device = resolve_device(args.device or record.device)
    request = ProfileRequest(
        resolve_model(args.model or record.model_source),
        device,
        parse_dtype(record.dtype, device),
        validate.bits_of(device_profile),
        record.grid,
        TimingOptions(layers=record.layers, group_size=record.group_size),
    )
    checks = validate.run_checks(
        device_profile, request, validate.validation_points(record.grid, args.points, args.seed)
    )
    rows = validate.summarize(checks)
    if args.json:
        sys.stdout.write(
            json.dumps(
                {
                    "profile": device_profile.name,
                    "model": device_profile.model,
                    "errors": [r.to_json() for r in rows],
                    "points": [c.to_json() for c in checks],
                }
            )
            + "\n"
        )
    else:
        sys.stdout.write(f"{device_profile.name}: {device_profile.model}, {args.points} held-out points per phase\n")
        sys.stdout.write(validate.render(rows))
    return 0


def run_link(args) -> int:
    from profiler import link

    if args.serve:
        return _serve_probe(args.listen)
    if not args.out:
        raise InvalidArgument("pqmesh profile link needs --out LINK.json (or --serve)")
    result = link.profile_link(args.target, repeats=args.repeats)
    link.write(result, args.out)
    sys.stdout.write(f"wrote {args.out}; paste into the cluster file:\n{result.toml()}")
    return 0


def _serve_probe(listen: str) -> int:
    import signal
    import tempfile
    import threading

    from profiler.link import start_probe_server

    with tempfile.TemporaryDirectory(prefix="pqmesh-link-") as root:
        server, port, servicer = start_probe_server(listen, Path(root))
        sys.stdout.write(
            f"link probe serving on port {port}; run `pqmesh profile link --target HOST:{port} --out link.json` "
            "on the other host\n"
        )
        sys.stdout.flush()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        server.stop(grace=2).wait()
        servicer.worker.stop()
    return 0
