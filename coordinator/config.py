"""The coordinator's one frozen configuration, filled from CLI flags (which systemd passes)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.replan import parse_device_address
from pqmesh import security
from pqmesh.errors import InvalidArgument, PqmeshError
from pqmesh.length_groups import DEFAULT_WINDOW
from pqmesh.metrics import add_metrics_flag
from pqmesh.plan import PipelinePlan


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str
    state_dir: Path
    plan: PipelinePlan  # with every stage's address
    model_id: str
    max_sequences: int = 32
    max_tokens_per_sequence: int = 1024
    model_root: Path | None = None
    tokenizer: Path | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    max_in_flight: int = 0  # 0: one micro-batch per stage
    dtype: str = ""
    connect_timeout: float = 30.0
    log_level: str = "info"
    step_timeout: float = 120.0  # seconds the next micro-batch reply may take (longer prefills get more)
    stage_recovery_timeout: float = 600.0  # seconds to get a failed stage back before unfinished jobs fail
    health_interval: float = 5.0  # seconds between stage health checks; 0 = off
    credentials: security.Credentials | None = None  # this server's TLS / mutual TLS / token
    stage_credentials: security.Credentials | None = None  # towards the stages: CA, client certificate, token
    max_pending_jobs: int = 64  # queued + running; past it SubmitJob answers RESOURCE_EXHAUSTED
    max_prompts_per_job: int = 10_000_000  # stored on disk, fed to the scheduler a window at a time
    max_prompt_bytes: int = 1 << 20  # one uploaded prompt (serialized); past it AppendPrompts is refused
    feed_window: int = 2048  # prompts read from the store into the scheduler at most at once
    prefill_length_window: int = DEFAULT_WINDOW  # prefill candidates per micro-batch place, grouped by length
    planner: str = ""  # HOST:PORT of the planner to re-plan with; "" = never re-plan
    replan_request: Path | None = None  # the PlanRequest (JSON) the plan came from, every usable device named
    device_addresses: tuple[tuple[str, str], ...] = ()  # (device name, stage address) of every such device
    replan_after: float = 30.0  # seconds a stage may stay unreachable before the coordinator re-plans
    rejoin_interval: float = 0.0  # seconds between checks for lost devices that answer again; 0 = never by itself
    release_mode: str = "in-band"  # freed KV slots: in the next micro-batch's header, or "rpc" (Release calls)
    max_watchers: int = 32  # open WatchJob streams (each holds a server thread)
    max_concurrent_rpcs: int = 256  # calls in progress or waiting for a thread; past it RESOURCE_EXHAUSTED
    metrics_listen: str = ""  # HOST:PORT of the Prometheus exporter; "" = off

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or len(self.plan.stages)

    @property
    def model_dir(self) -> Path | None:
        return self.model_root / self.model_id if self.model_root else None

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "CoordinatorConfig":
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            plan = PipelinePlan.from_file(args.plan, args.replica)
            if args.stage:
                plan = plan.with_addresses(args.stage)
            plan.require_addresses()
            credentials = security.from_args(args).require_server()
            stage_credentials = security.from_args(args, "stage-")
            device_addresses = tuple(parse_device_address(text) for text in args.device_address)
            if bool(args.planner) != bool(args.replan_request):
                raise InvalidArgument("--planner and --replan-request go together (re-planning needs both)")
            if args.rejoin_interval and not args.planner:
                raise InvalidArgument("--rejoin-interval re-plans with the devices that come back: it needs --planner "
                                      "and --replan-request")
        except PqmeshError as err:
            parser.error(str(err))
        return cls(args.listen, args.state_dir, plan, args.model_id, args.max_sequences, args.max_tokens_per_sequence,
                   args.model_root, args.tokenizer, tuple(args.eos_token_id), args.max_in_flight, args.dtype,
                   args.connect_timeout, args.log_level, step_timeout=args.step_timeout,
                   stage_recovery_timeout=args.stage_recovery_timeout, health_interval=max(args.health_interval, 0.0),
                   metrics_listen=args.metrics_listen,
                   credentials=credentials, stage_credentials=stage_credentials,
                   max_pending_jobs=args.max_pending_jobs, max_prompts_per_job=args.max_prompts_per_job,
                   max_prompt_bytes=args.max_prompt_bytes, feed_window=args.feed_window,
                   prefill_length_window=args.prefill_length_window,
                   release_mode=args.release_mode, planner=args.planner or "", replan_request=args.replan_request,
                   device_addresses=device_addresses, replan_after=args.replan_after,
                   rejoin_interval=args.rejoin_interval,
                   max_watchers=args.max_watchers, max_concurrent_rpcs=args.max_concurrent_rpcs)


def build_parser() -> argparse.ArgumentParser:
    """`pqmesh-coordinator`'s flags (systemd passes them from the env file)."""
    parser = argparse.ArgumentParser(prog="pqmesh-coordinator",
                                     description="Run batch generation jobs on a mesh of stage servers.")
    parser.add_argument(
        "--listen", type=_address, default="0.0.0.0:50051", help="HOST:PORT (port 0 picks a free one)"
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="directory of the job database")
    parser.add_argument("--plan", type=Path, required=True,
                        help="plan JSON: `pqmesh plan --json` output or its \"plan\" object, or a `pqmesh plan "
                             "--replicas --json` answer with --replica")
    parser.add_argument("--replica", type=int, default=None, metavar="N",
                        help="with a several-pipelines plan file: run its pipeline N (0-based), one coordinator each")
    parser.add_argument("--stage", type=_address, action="append", default=[], metavar="HOST:PORT",
                        help="stage address, once per stage in pipeline order (default: \"address\" in the plan)")
    parser.add_argument(
        "--model-id", required=True, help="checkpoint directory name under each stage's --model-root"
    )
    parser.add_argument("--max-sequences", type=_positive, default=32, help="KV-cache slots per stage (default 32)")
    parser.add_argument("--max-tokens-per-sequence", type=_positive, default=1024,
                        help="prompt + generated tokens per sequence (default 1024)")
    parser.add_argument("--model-root", type=Path, default=None,
                        help="local copy of the stages' model root: layer count, vocabulary and EOS checks")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory for text prompts (default: the model directory, if visible)")
    parser.add_argument("--eos-token-id", type=int, action="append", default=[],
                        help="end-of-sequence id (repeatable; default: from the model or tokenizer)")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="micro-batches in the pipeline at once (default: the number of stages)")
    parser.add_argument("--dtype", default="", help="activation dtype on the stages (default: the stage's choice)")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to wait for every stage to answer at bring-up (default 30)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--step-timeout", type=_seconds, default=120.0,
                        help="seconds the next micro-batch reply may take before its stage counts as hung "
                             "(a prefill of more than 4096 tokens gets proportionally more; default 120)")
    parser.add_argument("--stage-recovery-timeout", type=_seconds, default=600.0,
                        help="seconds to get a failed stage back (reconnecting with backoff) before the unfinished "
                             "jobs fail; finished results are kept (default 600)")
    parser.add_argument("--health-interval", type=float, default=5.0,
                        help="seconds between health checks of every stage; 0 turns them off (default 5)")
    _add_limit_flags(parser)
    _add_replan_flags(parser)
    security.add_flags(parser)
    security.add_flags(parser, prefix="stage-", server=False, peer="the stages")
    add_metrics_flag(parser)
    return parser


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Operator limits on jobs, uploads and calls, and the slot release mode."""
    parser.add_argument("--max-pending-jobs", type=_positive, default=64,
                        help="uploading + queued + running jobs; past it SubmitJob and CreateJob answer "
                             "RESOURCE_EXHAUSTED (default 64)")
    parser.add_argument("--max-prompts-per-job", type=_positive, default=10_000_000,
                        help="prompts in one job; past it AppendPrompts answers RESOURCE_EXHAUSTED and SubmitJob "
                             "INVALID_ARGUMENT (prompts wait on disk, not in memory; default 10000000)")
    parser.add_argument("--max-prompt-bytes", type=_positive, default=1 << 20,
                        help="bytes of one uploaded prompt; past it AppendPrompts answers INVALID_ARGUMENT "
                             "(default 1048576)")
    parser.add_argument("--feed-window", type=_positive, default=2048,
                        help="prompts read from the job database into the scheduler at most at once (bounds "
                             "memory; at least 2 x --max-sequences; default 2048)")
    parser.add_argument("--prefill-length-window", type=_positive, default=DEFAULT_WINDOW,
                        help="a prefill micro-batch takes the oldest waiting prompt and, among the next N x its "
                             "size, those nearest its length (rows are padded to the longest); 1 = first come, "
                             f"first served (default {DEFAULT_WINDOW})")
    parser.add_argument("--release-mode", choices=("in-band", "rpc"), default="in-band",
                        help="how finished sequences' KV slots are freed on the stages: in the header of the next "
                             "micro-batch (in-band, default) or by a Release call to every stage that waits behind "
                             "their queued micro-batches (rpc; kept for comparison, bench/recovery.py)")
    parser.add_argument("--max-watchers", type=_positive, default=32,
                        help="open WatchJob streams; past it WatchJob answers RESOURCE_EXHAUSTED (default 32)")
    parser.add_argument("--max-concurrent-rpcs", type=_positive, default=256,
                        help="calls in progress or queued for a thread; past it RESOURCE_EXHAUSTED (default 256)")


def _add_replan_flags(parser: argparse.ArgumentParser) -> None:
    """Re-planning onto the remaining devices when a stage is lost (coordinator.replan)."""
    group = parser.add_argument_group("re-planning")
    group.add_argument("--planner", type=_address, default=None, metavar="HOST:PORT",
                       help="planner to ask for a new plan when a stage stays unreachable (default: never re-plan)")
    group.add_argument("--replan-request", type=Path, default=None, metavar="FILE",
                       help="the PlanRequest JSON the plan came from, listing every usable device once by name "
                            "(count 1, spares included)")
    group.add_argument("--device-address", action="append", default=[], metavar="NAME=HOST:PORT",
                       help="stage server of a device of --replan-request (repeat for every device)")
    group.add_argument("--replan-after", type=_seconds, default=30.0,
                       help="seconds a stage may stay unreachable before re-planning without it (default 30; "
                            "below --stage-recovery-timeout)")
    group.add_argument("--rejoin-interval", type=_seconds, default=0.0,
                       help="every this many seconds, check whether lost devices' stage servers answer again and "
                            "re-plan with them when that is predicted faster (default 0: only by `pqmesh mesh "
                            "replan`)")
