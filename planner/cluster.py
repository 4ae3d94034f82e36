"""Clusters and workloads as data: the TOML cluster file, its proto form, and the job to plan for.

Cluster file::

    [[device]]            # one table per group of identical devices
    type = "V100-32G"     # a built-in type, or the device_type of a registered profile
    count = 2             # default 1
    name = "v100-node1"   # optional: registered profile name, and the stage label prefix
    host = "node1"        # optional: default one host per [[device]] table
    [network]             # optional
    bandwidth_gbps = 10   # between hosts (default 10)
    latency_us = 100      # (default 100)
    intra_host_bandwidth_gbps = 100   # between devices of one host (default 100, PCIe-class)
    intra_host_latency_us = 10        # (default 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import tomllib

from planner.devices import DeviceProfile, builtin_profile, normalize_type
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.cpuset import check_disjoint, parse_cpus
from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.lengths import GENERATION_SEED, LengthHistogram, draw

MAX_DEVICES = 4096  # per [[device]] entry; a plan needs at least one layer per device anyway
MAX_WORKLOAD = 1 << 24  # sequences or tokens: far past any real job, small enough to plan quickly

CLUSTER_VERSION = 1
WORKLOAD_VERSION = 1
DEFAULT_NETWORK = {
    "bandwidth_gbps": 10.0,
    "latency_us": 100.0,
    "intra_host_bandwidth_gbps": 100.0,
    "intra_host_latency_us": 10.0,
}


@dataclass(frozen=True)
class ClusterEntry:
    device_type: str
    count: int = 1
    name: str = ""
    host: str = ""

    def __post_init__(self) -> None:
        if not self.device_type.strip():
            raise InvalidArgument("every [[device]] needs a type, e.g. type = \"V100-32G\"")
        if not 1 <= self.count <= MAX_DEVICES:
            raise InvalidArgument(f"device {self.label!r}: count must be within 1..{MAX_DEVICES}, got {self.count}")

    @property
    def label(self) -> str:
        return self.name or normalize_type(self.device_type)

    def to_proto(self) -> planner_pb2.ClusterDevice:
        return planner_pb2.ClusterDevice(device_type=self.device_type, count=self.count, name=self.name, host=self.host)

    @classmethod
    def from_proto(cls, msg: planner_pb2.ClusterDevice) -> ClusterEntry:
        # proto3 leaves an unset count at 0, so 0 means the default, 1 (as in the cluster file)
        return cls(msg.device_type, msg.count or 1, msg.name, msg.host)


@dataclass(frozen=True)
class Network:
    bandwidth_gbps: float = DEFAULT_NETWORK["bandwidth_gbps"]
    latency_us: float = DEFAULT_NETWORK["latency_us"]
    intra_host_bandwidth_gbps: float = DEFAULT_NETWORK["intra_host_bandwidth_gbps"]
    intra_host_latency_us: float = DEFAULT_NETWORK["intra_host_latency_us"]

    def __post_init__(self) -> None:
        bandwidths, latencies = (
            (self.bandwidth_gbps, self.intra_host_bandwidth_gbps),
            (self.latency_us, self.intra_host_latency_us),
        )
        if not all(0 < v < math.inf for v in bandwidths):  # `not` form: NaN fails too
            raise InvalidArgument(f"[network] bandwidths must be positive, finite Gbit/s, got {bandwidths}")
        if not all(0 <= v < math.inf for v in latencies):
            raise InvalidArgument(f"[network] latencies must be finite and >= 0 microseconds, got {latencies}")

    def link_seconds(self, nbytes: float, same_host: bool) -> float:
        """One message of `nbytes` over the link: latency + bytes / bandwidth."""
        if same_host:
            return self.intra_host_latency_us * 1e-6 + nbytes * 8 / (self.intra_host_bandwidth_gbps * 1e9)
        return self.latency_us * 1e-6 + nbytes * 8 / (self.bandwidth_gbps * 1e9)

    def to_proto(self) -> planner_pb2.Network:
        return planner_pb2.Network(**self.__dict__)

    @classmethod
    def from_proto(cls, msg: planner_pb2.Network) -> Network:
        return cls(**{k: getattr(msg, k) or default for k, default in DEFAULT_NETWORK.items()})


@dataclass(frozen=True)
class Cluster:
    entries: tuple[ClusterEntry, ...]
    network: Network = Network()
    version: int = CLUSTER_VERSION

    def __post_init__(self) -> None:
        if self.version != CLUSTER_VERSION:
            raise InvalidArgument(f"cluster version {self.version} is not supported; use {CLUSTER_VERSION}")
        if not self.entries:
            raise InvalidArgument("the cluster has no devices; add at least one [[device]] table")

    def to_proto_fields(self) -> dict:
        return {"devices": [e.to_proto() for e in self.entries], "network": self.network.to_proto()}

    @classmethod
    def from_proto_fields(cls, devices, network: planner_pb2.Network | None) -> Cluster:
        return cls(
            tuple(ClusterEntry.from_proto(d) for d in devices), Network.from_proto(network) if network else Network()
        )

    @classmethod
    def from_toml(cls, text: str, source: str = "cluster file") -> Cluster:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise InvalidArgument(f"{source} is not valid TOML: {err}") from None
        unknown = sorted(set(data) - {"device", "network"})
        if unknown:
            raise InvalidArgument(f"{source}: unknown tables {unknown}; use [[device]] and [network]")
        entries = []
        for i, table in enumerate(data.get("device", [])):
            extra = sorted(set(table) - {"type", "count", "name", "host"})
            if extra:
                raise InvalidArgument(
                    f"{source}: [[device]] #{i + 1} has unknown keys {extra}; use type, count, name, host"
                )
            entries.append(
                ClusterEntry(
                    str(table.get("type", "")),
                    int(table.get("count", 1)),
                    str(table.get("name", "")),
                    str(table.get("host", "")),
                )
            )
        net = data.get("network", {})
        extra = sorted(set(net) - set(DEFAULT_NETWORK))
        if extra:
            raise InvalidArgument(f"{source}: [network] has unknown keys {extra}; use {sorted(DEFAULT_NETWORK)}")
        return cls(tuple(entries), Network(**{k: float(v) for k, v in net.items()}))

    @classmethod
    def load(cls, path: str | Path) -> Cluster:
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"cluster file {path} does not exist")
        return cls.from_toml(path.read_text(), source=str(path))

    def with_extra(self, device_type: str) -> Cluster:
        """This cluster plus one device of `device_type` on its own host (for infeasibility hints)."""
        return replace(self, entries=self.entries + (ClusterEntry(device_type, 1, host="extra-host"),))


@dataclass(frozen=True)
class Device:
    """One physical device of the cluster, with its resolved profile."""

    label: str  # stage label, e.g. "v100-32g:1"
    profile: DeviceProfile
    host: str

    @property
    def kind(self) -> tuple[str, str]:
        """Devices with the same kind are interchangeable in a pipeline."""
        return (self.profile.name, self.host)


ProfileLookup = Callable[[str], "DeviceProfile | None"]


def resolve_profile(entry: ClusterEntry, lookup: ProfileLookup | None) -> DeviceProfile:
    """Registered profile named `name`, else registered under the type's name, else the built-in type."""
    lookup = lookup or (lambda _name: None)
    for key in (entry.name, entry.device_type, normalize_type(entry.device_type)):
        found = lookup(key) if key else None
        if found is not None:
            return found
    try:
        return builtin_profile(entry.device_type)
    except NotFound:
        raise NotFound(f"device {entry.label!r}: no registered profile named {entry.name or entry.device_type!r} "
                       f"and no built-in type {entry.device_type!r}; register one or use a built-in type") from None


def expand(cluster: Cluster, lookup: ProfileLookup | None = None) -> tuple[Device, ...]:
    """Individual devices, in file order, labelled `label` or `label:k` when count > 1."""
    devices = []
    for i, entry in enumerate(cluster.entries):
        profile = resolve_profile(entry, lookup)
        host = entry.host or f"host{i}-{entry.label}"
        for k in range(entry.count):
            devices.append(Device(f"{entry.label}:{k}" if entry.count > 1 else entry.label, profile, host))
    labels = [d.label for d in devices]
    if len(set(labels)) != len(labels):
        raise InvalidArgument(f"device labels {labels} are not unique; give [[device]] tables distinct names")
    _check_pinned(devices)
    return tuple(devices)


def _check_pinned(devices: list[Device]) -> None:
    """A pinned profile is one set of cores: two devices of one host may not share a core."""
    by_host: dict[str, dict[str, tuple[int, ...]]] = {}
    for d in devices:
        if d.profile.cpus:
            by_host.setdefault(d.host, {})[d.label] = parse_cpus(d.profile.cpus)
    for host, sets in by_host.items():
        try:
            check_disjoint(sets)
        except InvalidArgument as err:
            raise InvalidArgument(f"host {host!r}: {err} (a profile made with `pqmesh profile --cpus` is one device: "
                                  "count 1, and every device of a host needs its own profile)") from None


@dataclass(frozen=True)
class Workload:
    """The offline job: `batch_size` sequences planned together, `prompt_length` tokens each and
    `generation_length` new each; or, with `prompts` / `generations`, the job's length histograms.

    With histograms, `prompt_length` and `generation_length` are their means (rounded up), which the
    closed-form cost model ranks plans at; the KV cache and the prefill buffers are sized for the
    longest (`max_context`), and the job-time replay draws `batch_size` sequences from the histograms
    (`prompt_sample`, `generation_sample`). `batch_size` 0 means the prompt histogram's total count.
    """

    batch_size: int
    prompt_length: int = 0
    generation_length: int = 0
    version: int = WORKLOAD_VERSION
    prompts: LengthHistogram | None = None
    generations: LengthHistogram | None = None
    kv_tokens: int = 0  # KV tokens per sequence the stages allocate; 0: longest prompt + longest generation

    def __post_init__(self) -> None:
        if self.version != WORKLOAD_VERSION:
            raise InvalidArgument(f"workload version {self.version} is not supported; use {WORKLOAD_VERSION}")
        for name, hist in (("prompt_length", self.prompts), ("generation_length", self.generations)):
            if hist is None:
                continue
            mean = max(1, math.ceil(hist.mean - 1e-9))
            if getattr(self, name) not in (0, mean):
                raise InvalidArgument(f"workload sets both {name} {getattr(self, name)} and a histogram of "
                                      f"{name.replace('_length', '')} lengths (mean {hist.mean:.1f}): set one")
            object.__setattr__(self, name, mean)
        if self.batch_size == 0 and self.prompts is not None:
            object.__setattr__(self, "batch_size", min(self.prompts.total, MAX_WORKLOAD))
        for name in ("batch_size", "prompt_length", "generation_length"):
            if not 1 <= getattr(self, name) <= MAX_WORKLOAD:
                raise InvalidArgument(f"workload {name} must be within 1..{MAX_WORKLOAD}, got {getattr(self, name)}")
        longest = self.max_prompt_length + self.max_generation_length
        if max(longest, self.kv_tokens) > MAX_WORKLOAD:
            raise InvalidArgument(f"workload's KV tokens per sequence {max(longest, self.kv_tokens)} exceed "
                                  f"{MAX_WORKLOAD}")
        if 0 < self.kv_tokens < longest:
            raise InvalidArgument(f"kv_tokens_per_sequence {self.kv_tokens} is less than the longest prompt + "
                                  f"generation ({longest}): raise it or drop the longer lengths")

    @property
    def max_prompt_length(self) -> int:
        return self.prompts.longest if self.prompts is not None else self.prompt_length

    @property
    def max_generation_length(self) -> int:
        return self.generations.longest if self.generations is not None else self.generation_length

    @property
    def max_context(self) -> int:
        """Tokens of KV cache per sequence: `kv_tokens`, else the longest prompt plus the longest generation."""
        return self.kv_tokens or self.max_prompt_length + self.max_generation_length

    @property
    def job_sequences(self) -> int:
        """Sequences of the whole job: the prompt histogram's total count, else `batch_size`."""
        return self.prompts.total if self.prompts is not None else self.batch_size

    @property
    def has_histograms(self) -> bool:
        return self.prompts is not None or self.generations is not None

    def prompt_sample(self, n: int | None = None) -> list[int]:
        """``n`` (default `batch_size`) prompt lengths of the job, in the histogram's proportions."""
        return draw(self.prompts, self.prompt_length, n or self.batch_size)

    def generation_sample(self, n: int | None = None) -> list[int]:
        return draw(self.generations, self.generation_length, n or self.batch_size, GENERATION_SEED)

    def to_proto(self) -> planner_pb2.Workload:
        msg = planner_pb2.Workload(batch_size=self.batch_size, kv_tokens_per_sequence=self.kv_tokens)
        if self.prompts is None:
            msg.prompt_length = self.prompt_length
        else:
            msg.prompt_lengths.extend(self.prompts.to_proto())
        if self.generations is None:
            msg.generation_length = self.generation_length
        else:
            msg.generation_lengths.extend(self.generations.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: planner_pb2.Workload) -> Workload:
        prompts = LengthHistogram.from_proto(msg.prompt_lengths)
        generations = LengthHistogram.from_proto(msg.generation_lengths)
        return cls(msg.batch_size, msg.prompt_length, msg.generation_length, prompts=prompts, generations=generations,
                   kv_tokens=msg.kv_tokens_per_sequence)
