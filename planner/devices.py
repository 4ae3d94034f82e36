"""Device profiles: memory capacity and a latency model per (bits, phase).

A profile always carries a `Roofline` (datasheet peak fp16 tensor throughput and memory bandwidth
with efficiency factors); a profiler may add `LatencyModel` entries fitted on one model's decoder
layer, which then replace the roofline for that (bits, phase) when planning that model. Built-in
profiles for common GPUs are roofline-only and labelled uncalibrated.

JSON form of a profile: the proto3 JSON mapping of `pqmesh.planner.v1.DeviceProfile` with the
original field names, e.g.
``{"name": "t4-a", "device_type": "T4", "memory_bytes": "16106127360", "version": 1,
"roofline": {"peak_fp16_tflops": 65, "memory_bandwidth_gbs": 320},
"model": "opt-30b", "latency": [{"bits": 4, "phase": "PHASE_DECODE",
"features": ["const", "tokens", "tokens*context"], "coefficients": [2e-4, 1e-6, 3e-10], "calibrated": true}]}``.

`reserve_bytes` (JSON key ``"reserve_bytes"``, a uint64 so a string or a number) is what the
planner leaves unused of ``memory_bytes`` on that device. Absent: `DEFAULT_RESERVE_BYTES` (1 GiB, a
CUDA context), as for the built-in GPUs. A CPU stage profile whose ``memory_bytes`` is the stage's
``--memory-budget`` sets it explicitly, e.g. ``"reserve_bytes": "0"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.protobuf import json_format

from planner.hashing import cached_hash, state_without_hash
from pqmesh.api.planner.v1 import planner_pb2
from pqmesh.cpuset import parse_cpus
from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.types import DTYPE_BYTES, Bits, Phase

PROFILE_VERSION = 1
MIB = 1 << 20
#: Regressors a fitted latency model may use, per decoder layer and micro-batch. "batch": sequences in
#: the micro-batch; "tokens": new tokens (batch x prompt in prefill, batch in decode); "context": keys
#: attended per token (prompt in prefill, cached + new in decode).
FEATURES = ("const", "batch", "tokens", "tokens*context")

DEFAULT_COMPUTE_EFFICIENCY = 0.5
DEFAULT_MEMORY_EFFICIENCY = 0.7
DEFAULT_DEQUANT_OVERHEAD = 1.2
DEFAULT_LAYER_OVERHEAD_US = 50.0


@dataclass(frozen=True)
class Roofline:
    """Datasheet figures and (uncalibrated) efficiency factors of one GPU type."""

    peak_fp16_tflops: float
    memory_bandwidth_gbs: float
    compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY
    memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY
    dequant_overhead: float = DEFAULT_DEQUANT_OVERHEAD
    layer_overhead_us: float = DEFAULT_LAYER_OVERHEAD_US

    def __post_init__(self) -> None:
        if not all(0 < v < float("inf") for v in (self.peak_fp16_tflops, self.memory_bandwidth_gbs)):  # NaN fails too
            raise InvalidArgument(
                "roofline needs positive peak_fp16_tflops and memory_bandwidth_gbs (datasheet values)"
            )
        for name in ("compute_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise InvalidArgument(f"roofline {name} must be in (0, 1], got {getattr(self, name)}")
        if not (1 <= self.dequant_overhead < float("inf") and 0 <= self.layer_overhead_us < float("inf")):
            raise InvalidArgument("roofline dequant_overhead must be >= 1 and layer_overhead_us >= 0")

    def seconds(self, flops: float, bytes_moved: float, quantized: bool) -> float:
        """max(compute time, memory time) + the fixed per-layer overhead."""
        compute = flops / (self.peak_fp16_tflops * 1e12 * self.compute_efficiency)
        if quantized:
            compute *= self.dequant_overhead
        memory = bytes_moved / (self.memory_bandwidth_gbs * 1e9 * self.memory_efficiency)
        return max(compute, memory) + self.layer_overhead_us * 1e-6

    def to_proto(self) -> planner_pb2.Roofline:
        return planner_pb2.Roofline(**self.__dict__)

    @classmethod
    def from_proto(cls, msg: planner_pb2.Roofline) -> Roofline:
        defaults = cls(1.0, 1.0)
        values = {k: getattr(msg, k) or getattr(defaults, k) for k in defaults.__dict__}
        values["peak_fp16_tflops"], values["memory_bandwidth_gbs"] = msg.peak_fp16_tflops, msg.memory_bandwidth_gbs
        return cls(**values)


@dataclass(frozen=True)
class LatencyModel:
    """Seconds for one decoder layer and one micro-batch = sum(coefficient x feature)."""

    bits: Bits
    phase: Phase
    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    calibrated: bool = True

    def __post_init__(self) -> None:
        if len(self.features) != len(self.coefficients) or not self.features:
            raise InvalidArgument(f"latency model {self.bits.value}-bit {self.phase.name.lower()}: "
                                  "features and coefficients must be non-empty and of equal length")
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise InvalidArgument(f"latency model features {unknown} are unknown; use {list(FEATURES)}")
        if not all(abs(c) < float("inf") for c in self.coefficients):  # NaN fails too
            raise InvalidArgument(
                f"latency model {self.bits.value}-bit {self.phase.name.lower()}: coefficients must be "
                f"finite, got {list(self.coefficients)}"
            )

    def seconds(self, batch: int, tokens: int, context: int) -> float:
        values = {"const": 1.0, "batch": batch, "tokens": tokens, "tokens*context": tokens * context}
        return max(0.0, sum(c * values[f] for f, c in zip(self.features, self.coefficients)))

    def to_proto(self) -> planner_pb2.LatencyModel:
        return planner_pb2.LatencyModel(bits=self.bits.to_proto(), phase=self.phase.to_proto(), features=self.features,
                                        coefficients=self.coefficients, calibrated=self.calibrated)

    @classmethod
    def from_proto(cls, msg: planner_pb2.LatencyModel) -> LatencyModel:
        if msg.phase == 0:
            raise InvalidArgument("latency model phase is PHASE_UNSPECIFIED; set PHASE_PREFILL or PHASE_DECODE")
        return cls(
            Bits.from_proto(msg.bits), Phase(msg.phase), tuple(msg.features), tuple(msg.coefficients), msg.calibrated
        )


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    device_type: str
    memory_bytes: int
    roofline: Roofline
    latency: tuple[LatencyModel, ...] = ()
    model: str = ""
    version: int = PROFILE_VERSION
    reserve_bytes: int | None = None  # None: the planner default (1 GiB)
    dtype: str = ""  # what the profiled layers ran in; a plan request without dtype takes it
    model_fingerprint: str = ""  # planner.model_shapes.ModelShape.fingerprint of `model`
    cpus: str = ""  # the pinned core set ("0-3") a CPU device is; "" = not pinned
    _fitted: dict = field(default=None, init=False, repr=False, compare=False)
    __hash__ = cached_hash
    __getstate__ = state_without_hash

    def __post_init__(self) -> None:
        if self.version != PROFILE_VERSION:
            raise InvalidArgument(
                f"device profile {self.name!r} has version {self.version}; this planner reads {PROFILE_VERSION}"
            )
        if not self.name.strip():
            raise InvalidArgument("device profile needs a non-empty name")
        if self.memory_bytes <= 0:
            raise InvalidArgument(f"device profile {self.name!r}: memory_bytes must be positive")
        if self.reserve_bytes is not None and not 0 <= self.reserve_bytes < self.memory_bytes:
            raise InvalidArgument(
                f"device profile {self.name!r}: reserve_bytes {self.reserve_bytes} must be at least 0 and "
                f"below memory_bytes {self.memory_bytes}; leave it unset for the 1 GiB default"
            )
        if not isinstance(self.roofline, Roofline):
            raise InvalidArgument(
                f"device profile {self.name!r} lacks a roofline; add peak_fp16_tflops and memory_bandwidth_gbs"
            )
        keys = [(m.bits, m.phase) for m in self.latency]
        if len(set(keys)) != len(keys):
            raise InvalidArgument(f"device profile {self.name!r} has two latency models for one (bits, phase)")
        if self.dtype and self.dtype not in DTYPE_BYTES:
            raise InvalidArgument(f"device profile {self.name!r}: dtype {self.dtype!r} is not one of "
                                  f"{sorted(DTYPE_BYTES)}; leave it empty when unknown")
        if self.cpus:
            parse_cpus(self.cpus)  # InvalidArgument says how to write it
        if self.latency and not self.model:
            raise InvalidArgument(
                f"device profile {self.name!r} has fitted latency models; set `model` to the model they were fitted on"
            )
        object.__setattr__(self, "_fitted", dict(zip(keys, self.latency)))

    @property
    def calibrated(self) -> bool:
        return any(m.calibrated for m in self.latency)

    def fits_model(self, model) -> bool:
        """True when the fitted entries apply to `model`: a name, or a ModelShape (same name or same shape)."""
        if isinstance(model, str):
            return model == self.model
        return model.name == self.model or bool(self.model_fingerprint and model.fingerprint == self.model_fingerprint)

    def fitted(self, model, bits: Bits, phase: Phase) -> LatencyModel | None:
        """The fitted model for this (bits, phase), if fitted on `model` (a name or a ModelShape)."""
        return self._fitted.get((bits, phase)) if self.fits_model(model) else None

    def to_proto(self) -> planner_pb2.DeviceProfile:
        return planner_pb2.DeviceProfile(
            name=self.name, device_type=self.device_type, memory_bytes=self.memory_bytes, version=self.version,
            latency=[m.to_proto() for m in self.latency], roofline=self.roofline.to_proto(), model=self.model,
            reserve_bytes=self.reserve_bytes, dtype=self.dtype, model_fingerprint=self.model_fingerprint,
            cpus=self.cpus)

    @classmethod
    def from_proto(cls, msg: planner_pb2.DeviceProfile) -> DeviceProfile:
        if not msg.HasField("roofline"):
            raise InvalidArgument(
                f"device profile {msg.name!r} lacks a roofline; add peak_fp16_tflops and memory_bandwidth_gbs"
            )
        return cls(
            name=msg.name,
            device_type=msg.device_type,
            memory_bytes=msg.memory_bytes,
            roofline=Roofline.from_proto(msg.roofline),
            latency=tuple(LatencyModel.from_proto(m) for m in msg.latency),
            model=msg.model,
            version=msg.version,
            reserve_bytes=msg.reserve_bytes if msg.HasField("reserve_bytes") else None,
            dtype=msg.dtype,
            model_fingerprint=msg.model_fingerprint,
            cpus=msg.cpus,
        )

    def to_json(self) -> str:
        return json_format.MessageToJson(self.to_proto(), preserving_proto_field_name=True, indent=None)

    @classmethod
    def from_json(cls, text: str) -> DeviceProfile:
        try:
            msg = json_format.Parse(text, planner_pb2.DeviceProfile())
        except json_format.ParseError as err:
            raise InvalidArgument(
                f"device profile JSON does not match pqmesh.planner.v1.DeviceProfile: {err}"
            ) from None
        return cls.from_proto(msg)


#: Datasheet figures: (memory MiB as reported by nvidia-smi, approx.; dense fp16 tensor TFLOP/s with
#: fp32 accumulate; memory bandwidth GB/s). P100 has no tensor cores: its fp16 vector peak.
BUILTIN_GPUS: dict[str, tuple[int, float, float]] = {
    "t4": (15360, 65.0, 320.0),
    "p100-12g": (12198, 18.7, 549.0),
    "v100-16g": (16160, 125.0, 900.0),
    "v100-32g": (32510, 125.0, 900.0),
    "a10g": (23028, 70.0, 600.0),
    "l4": (23034, 121.0, 300.0),
    "a100-40g": (40960, 312.0, 1555.0),
    "a100-80g": (81920, 312.0, 2039.0),
    "a800-80g": (81920, 312.0, 2039.0),
    "rtx-3090": (24576, 71.0, 936.0),
    "rtx-4090": (24564, 165.2, 1008.0),
    "h100-80g": (81559, 989.0, 3350.0),
    "h200": (143771, 989.0, 4800.0),
}
_TYPE_ALIASES = {"3090": "rtx-3090", "4090": "rtx-4090", "h100": "h100-80g", "h200-141g": "h200", "a10": "a10g"}


def normalize_type(device_type: str) -> str:
    """"NVIDIA V100_32GB" -> "v100-32g"; "RTX 3090" -> "rtx-3090"."""
    text = re.sub(r"[\s_]+", "-", device_type.strip().lower())
    text = re.sub(r"^(nvidia|tesla|geforce)-", "", text)
    text = re.sub(r"(\d+)gb$", r"\1g", text)
    return _TYPE_ALIASES.get(text, text)


def builtin_profile(device_type: str, name: str = "") -> DeviceProfile:
    """The uncalibrated roofline profile of a built-in GPU type."""
    key = normalize_type(device_type)
    if key not in BUILTIN_GPUS:
        raise NotFound(f"no built-in profile for device type {device_type!r}; use one of {sorted(BUILTIN_GPUS)} "
                       "or register a profile with RegisterDevice")
    mib, tflops, gbs = BUILTIN_GPUS[key]
    return DeviceProfile(name=name or key, device_type=key, memory_bytes=mib * MIB, roofline=Roofline(tflops, gbs))
