"""The stage server's one frozen configuration, filled from CLI flags (which systemd passes)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from pqmesh import security
from pqmesh.capacity import physical_memory_bytes  # noqa: F401 - re-exported for callers
from pqmesh.cpuset import check_available, parse_cpus
from pqmesh.errors import PqmeshError
from pqmesh.metrics import add_metrics_flag

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '512MB', '1e9' or a plain integer -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; write e.g. 8GiB, 512MB or 1000000")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


@dataclass(frozen=True)
class StageConfig:
    listen: str
    device: str
    memory_budget: int  # bytes this stage may hold (weights + KV cache); 0 = derive from the device
    model_root: Path
    queue_depth: int
    log_level: str
    credentials: security.Credentials | None = None  # serves with it; also the identity towards the next stage
    allowed_client_cns: tuple[str, ...] = ()  # LoadShard, Release and Forward (the coordinator)
    allowed_forward_cns: tuple[str, ...] = ()  # Forward only (the previous stage)
    metrics_listen: str = ""  # HOST:PORT of the Prometheus exporter; "" = off
    cpus: tuple[int, ...] = ()  # --cpus: pin the process to these cores (one thread each); () = unpinned
    keep_shards: bool = True  # --no-keep-shard turns it off: a LoadShard that changes only plan id / next hop reloads

    def __post_init__(self) -> None:
        if (self.allowed_client_cns or self.allowed_forward_cns) and not (self.credentials and self.credentials.mutual):
            raise ValueError("--allowed-client-cn and --allowed-forward-cn check client certificates: "
                             "they need mutual TLS (--tls-cert, --tls-key and --tls-ca)")
        if self.cpus:
            if not self.device.startswith("cpu"):
                raise ValueError(f"--cpus pins a CPU stage; a {self.device} stage keeps --memory-budget instead")
            check_available(self.cpus)
        if self.allowed_forward_cns and not self.allowed_client_cns:
            raise ValueError("--allowed-forward-cn needs --allowed-client-cn too (the coordinator's CN), "
                             "or LoadShard and Release stay open to every certificate of the CA")

    def allowed_methods(self) -> dict[str, tuple[str, ...]]:
        """Full method name -> client CNs allowed to call it (empty: no identity check)."""
        if not self.allowed_client_cns:
            return {}
        prefix = "/pqmesh.stage.v1.StageService/"
        return {prefix + "LoadShard": self.allowed_client_cns, prefix + "Release": self.allowed_client_cns,
                prefix + "Forward": self.allowed_client_cns + self.allowed_forward_cns}

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "StageConfig":
        parser = argparse.ArgumentParser(prog="pqmesh-stage", description="Serve one pipeline stage over gRPC.")
        parser.add_argument("--listen", default="0.0.0.0:50060",
                            help="HOST:PORT (port 0 picks a free one; default 0.0.0.0:50060, as pqmesh-stage@0)")
        parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
        parser.add_argument("--memory-budget", type=parse_bytes, default=0,
                            help="bytes for weights + KV cache, e.g. 20GiB (default: the device's memory minus "
                                 "the reserve the planner assumes, pqmesh.capacity: 1 GiB of a GPU, 20%% of RAM)")
        parser.add_argument("--cpus", default="",
                            help="CPU stage: run only on these cores, e.g. 0-3 (an affinity list), with one torch "
                                 "thread per core; profile with the same `pqmesh profile --cpus`")
        parser.add_argument("--model-root", type=Path, required=True,
                            help="directory whose sub-directories are safetensors checkpoints (model ids)")
        parser.add_argument("--queue-depth", type=int, default=8, help="micro-batches buffered before backpressure")
        parser.add_argument("--log-level", default="info")
        add_metrics_flag(parser)
        security.add_flags(parser)
        parser.add_argument("--allowed-client-cn", action="append", default=[], metavar="CN",
                            help="with mutual TLS: only clients whose certificate CN is one of these (repeatable) may "
                                 "call LoadShard, Release and Forward, e.g. coordinator")
        parser.add_argument("--allowed-forward-cn", action="append", default=[], metavar="CN",
                            help="with mutual TLS: CNs also allowed to call Forward: the previous stage, e.g. stage "
                                 "(chained streams come from it, with its own certificate)")
        parser.add_argument("--no-keep-shard", dest="keep_shards", action="store_false",
                            help="reload the weights on every LoadShard, even one that changes only the plan id or "
                                 "next hop (by default such a load keeps the shard in memory; see BENCHMARKS)")
        args = parser.parse_args(argv)
        try:
            return cls(args.listen, args.device, args.memory_budget, args.model_root, args.queue_depth, args.log_level,
                       credentials=security.from_args(args).require_server(),
                       allowed_client_cns=tuple(args.allowed_client_cn),
                       allowed_forward_cns=tuple(args.allowed_forward_cn), metrics_listen=args.metrics_listen,
                       cpus=parse_cpus(args.cpus) if args.cpus else (), keep_shards=args.keep_shards)
        except (PqmeshError, ValueError) as err:
            parser.error(str(err))
