from pqmesh.api.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LatencyModel(_message.Message):
    __slots__ = ("bits", "phase", "coefficients", "features", "calibrated")
    BITS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    bits: _tensor_pb2.Bits
    phase: _tensor_pb2.Phase
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    features: _containers.RepeatedScalarFieldContainer[str]
    calibrated: bool
    def __init__(self, bits: _Optional[_Union[_tensor_pb2.Bits, str]] = ..., phase: _Optional[_Union[_tensor_pb2.Phase, str]] = ..., coefficients: _Optional[_Iterable[float]] = ..., features: _Optional[_Iterable[str]] = ..., calibrated: _Optional[bool] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("name", "device_type", "memory_bytes", "latency", "version", "roofline", "model", "reserve_bytes", "dtype", "model_fingerprint", "cpus")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROOFLINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    device_type: str
    memory_bytes: int
    latency: _containers.RepeatedCompositeFieldContainer[LatencyModel]
    version: int
    roofline: Roofline
    model: str
    reserve_bytes: int
    dtype: str
    model_fingerprint: str
    cpus: str
    def __init__(self, name: _Optional[str] = ..., device_type: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., latency: _Optional[_Iterable[_Union[LatencyModel, _Mapping]]] = ..., version: _Optional[int] = ..., roofline: _Optional[_Union[Roofline, _Mapping]] = ..., model: _Optional[str] = ..., reserve_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., cpus: _Optional[str] = ...) -> None: ...

class Roofline(_message.Message):
    __slots__ = ("peak_fp16_tflops", "memory_bandwidth_gbs", "compute_efficiency", "memory_efficiency", "dequant_overhead", "layer_overhead_us")
    PEAK_FP16_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_GBS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    DEQUANT_OVERHEAD_FIELD_NUMBER: _ClassVar[int]
    LAYER_OVERHEAD_US_FIELD_NUMBER: _ClassVar[int]
    peak_fp16_tflops: float
    memory_bandwidth_gbs: float
    compute_efficiency: float
    memory_efficiency: float
    dequant_overhead: float
    layer_overhead_us: float
    def __init__(self, peak_fp16_tflops: _Optional[float] = ..., memory_bandwidth_gbs: _Optional[float] = ..., compute_efficiency: _Optional[float] = ..., memory_efficiency: _Optional[float] = ..., dequant_overhead: _Optional[float] = ..., layer_overhead_us: _Optional[float] = ...) -> None: ...

class RegisterDeviceRequest(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: DeviceProfile
    def __init__(self, profile: _Optional[_Union[DeviceProfile, _Mapping]] = ...) -> None: ...

class RegisterDeviceResponse(_message.Message):
    __slots__ = ("profile", "replaced")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    profile: DeviceProfile
    replaced: bool
    def __init__(self, profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., replaced: _Optional[bool] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceProfile]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceProfile, _Mapping]]] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ClusterDevice(_message.Message):
    __slots__ = ("device_type", "count", "name", "host")
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    device_type: str
    count: int
    name: str
    host: str
    def __init__(self, device_type: _Optional[str] = ..., count: _Optional[int] = ..., name: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class Network(_message.Message):
    __slots__ = ("bandwidth_gbps", "latency_us", "intra_host_bandwidth_gbps", "intra_host_latency_us")
    BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    INTRA_HOST_BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    INTRA_HOST_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    bandwidth_gbps: float
    latency_us: float
    intra_host_bandwidth_gbps: float
    intra_host_latency_us: float
    def __init__(self, bandwidth_gbps: _Optional[float] = ..., latency_us: _Optional[float] = ..., intra_host_bandwidth_gbps: _Optional[float] = ..., intra_host_latency_us: _Optional[float] = ...) -> None: ...

class LengthCount(_message.Message):
    __slots__ = ("length", "count")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    length: int
    count: int
    def __init__(self, length: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("batch_size", "prompt_length", "generation_length", "prompt_lengths", "generation_lengths", "kv_tokens_per_sequence")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    prompt_length: int
    generation_length: int
    prompt_lengths: _containers.RepeatedCompositeFieldContainer[LengthCount]
    generation_lengths: _containers.RepeatedCompositeFieldContainer[LengthCount]
    kv_tokens_per_sequence: int
    def __init__(self, batch_size: _Optional[int] = ..., prompt_length: _Optional[int] = ..., generation_length: _Optional[int] = ..., prompt_lengths: _Optional[_Iterable[_Union[LengthCount, _Mapping]]] = ..., generation_lengths: _Optional[_Iterable[_Union[LengthCount, _Mapping]]] = ..., kv_tokens_per_sequence: _Optional[int] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("model_name", "model_config_json", "devices", "network", "workload", "theta", "quality_bound", "indicator_json", "time_limit_seconds", "allowed_bits", "dtype", "coordinator_turnaround_us")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    QUALITY_BOUND_FIELD_NUMBER: _ClassVar[int]
    INDICATOR_JSON_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_BITS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_TURNAROUND_US_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_config_json: str
    devices: _containers.RepeatedCompositeFieldContainer[ClusterDevice]
    network: Network
    workload: Workload
    theta: float
    quality_bound: float
    indicator_json: str
    time_limit_seconds: float
    allowed_bits: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Bits]
    dtype: str
    coordinator_turnaround_us: float
    def __init__(self, model_name: _Optional[str] = ..., model_config_json: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[ClusterDevice, _Mapping]]] = ..., network: _Optional[_Union[Network, _Mapping]] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., theta: _Optional[float] = ..., quality_bound: _Optional[float] = ..., indicator_json: _Optional[str] = ..., time_limit_seconds: _Optional[float] = ..., allowed_bits: _Optional[_Iterable[_Union[_tensor_pb2.Bits, str]]] = ..., dtype: _Optional[str] = ..., coordinator_turnaround_us: _Optional[float] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("device", "layers", "bits")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    device: str
    layers: _tensor_pb2.LayerRange
    bits: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Bits]
    def __init__(self, device: _Optional[str] = ..., layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., bits: _Optional[_Iterable[_Union[_tensor_pb2.Bits, str]]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("plan_id", "stages", "prefill_micro_batch", "decode_micro_batch", "version", "cost")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    DECODE_MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    stages: _containers.RepeatedCompositeFieldContainer[Stage]
    prefill_micro_batch: int
    decode_micro_batch: int
    version: int
    cost: MeshCost
    def __init__(self, plan_id: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., prefill_micro_batch: _Optional[int] = ..., decode_micro_batch: _Optional[int] = ..., version: _Optional[int] = ..., cost: _Optional[_Union[MeshCost, _Mapping]] = ...) -> None: ...

class PhaseCost(_message.Message):
    __slots__ = ("const_s", "per_sequence_s", "per_token_s", "per_token_key_s")
    CONST_S_FIELD_NUMBER: _ClassVar[int]
    PER_SEQUENCE_S_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_KEY_S_FIELD_NUMBER: _ClassVar[int]
    const_s: float
    per_sequence_s: float
    per_token_s: float
    per_token_key_s: float
    def __init__(self, const_s: _Optional[float] = ..., per_sequence_s: _Optional[float] = ..., per_token_s: _Optional[float] = ..., per_token_key_s: _Optional[float] = ...) -> None: ...

class StageCost(_message.Message):
    __slots__ = ("prefill", "decode", "hop_latency_s", "hop_bytes_per_s")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    HOP_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    HOP_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    prefill: PhaseCost
    decode: PhaseCost
    hop_latency_s: float
    hop_bytes_per_s: float
    def __init__(self, prefill: _Optional[_Union[PhaseCost, _Mapping]] = ..., decode: _Optional[_Union[PhaseCost, _Mapping]] = ..., hop_latency_s: _Optional[float] = ..., hop_bytes_per_s: _Optional[float] = ...) -> None: ...

class MeshCost(_message.Message):
    __slots__ = ("stages", "hidden_bytes_per_token", "coordinator_s", "send_latency_s")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_S_FIELD_NUMBER: _ClassVar[int]
    SEND_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageCost]
    hidden_bytes_per_token: int
    coordinator_s: float
    send_latency_s: float
    def __init__(self, stages: _Optional[_Iterable[_Union[StageCost, _Mapping]]] = ..., hidden_bytes_per_token: _Optional[int] = ..., coordinator_s: _Optional[float] = ..., send_latency_s: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("throughput_tokens_per_s", "prefill_s", "decode_s", "memory_bytes", "quality", "job_s")
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    JOB_S_FIELD_NUMBER: _ClassVar[int]
    throughput_tokens_per_s: float
    prefill_s: float
    decode_s: float
    memory_bytes: _containers.RepeatedScalarFieldContainer[int]
    quality: float
    job_s: float
    def __init__(self, throughput_tokens_per_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., memory_bytes: _Optional[_Iterable[int]] = ..., quality: _Optional[float] = ..., job_s: _Optional[float] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("feasible", "predicted", "reason", "plan")
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    feasible: bool
    predicted: Prediction
    reason: str
    plan: Plan
    def __init__(self, feasible: _Optional[bool] = ..., predicted: _Optional[_Union[Prediction, _Mapping]] = ..., reason: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("plan", "predicted", "baselines", "solve_seconds", "optimality_gap")
    class BaselinesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Baseline
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPTIMALITY_GAP_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    predicted: Prediction
    baselines: _containers.MessageMap[str, Baseline]
    solve_seconds: float
    optimality_gap: float
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., predicted: _Optional[_Union[Prediction, _Mapping]] = ..., baselines: _Optional[_Mapping[str, Baseline]] = ..., solve_seconds: _Optional[float] = ..., optimality_gap: _Optional[float] = ...) -> None: ...

class WhatIfRequest(_message.Message):
    __slots__ = ("base", "time_limit_seconds", "frontier_points", "extra_device_types")
    BASE_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_POINTS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_DEVICE_TYPES_FIELD_NUMBER: _ClassVar[int]
    base: PlanRequest
    time_limit_seconds: float
    frontier_points: int
    extra_device_types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, base: _Optional[_Union[PlanRequest, _Mapping]] = ..., time_limit_seconds: _Optional[float] = ..., frontier_points: _Optional[int] = ..., extra_device_types: _Optional[_Iterable[str]] = ...) -> None: ...

class DeviceChange(_message.Message):
    __slots__ = ("device_type", "delta", "host", "feasible", "reason", "marginal_tokens_per_s", "plan", "note")
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MARGINAL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    device_type: str
    delta: int
    host: str
    feasible: bool
    reason: str
    marginal_tokens_per_s: float
    plan: PlanResponse
    note: str
    def __init__(self, device_type: _Optional[str] = ..., delta: _Optional[int] = ..., host: _Optional[str] = ..., feasible: _Optional[bool] = ..., reason: _Optional[str] = ..., marginal_tokens_per_s: _Optional[float] = ..., plan: _Optional[_Union[PlanResponse, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class FrontierPoint(_message.Message):
    __slots__ = ("quality_bound", "feasible", "reason", "plan", "note")
    QUALITY_BOUND_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    quality_bound: float
    feasible: bool
    reason: str
    plan: PlanResponse
    note: str
    def __init__(self, quality_bound: _Optional[float] = ..., feasible: _Optional[bool] = ..., reason: _Optional[str] = ..., plan: _Optional[_Union[PlanResponse, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class MaxBatch(_message.Message):
    __slots__ = ("batch_size", "feasible", "reason", "plan", "batch_size_bound", "note")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_BOUND_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    feasible: bool
    reason: str
    plan: PlanResponse
    batch_size_bound: int
    note: str
    def __init__(self, batch_size: _Optional[int] = ..., feasible: _Optional[bool] = ..., reason: _Optional[str] = ..., plan: _Optional[_Union[PlanResponse, _Mapping]] = ..., batch_size_bound: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class WhatIfResponse(_message.Message):
    __slots__ = ("base", "devices", "frontier", "max_batch", "solve_seconds")
    BASE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    base: PlanResponse
    devices: _containers.RepeatedCompositeFieldContainer[DeviceChange]
    frontier: _containers.RepeatedCompositeFieldContainer[FrontierPoint]
    max_batch: MaxBatch
    solve_seconds: float
    def __init__(self, base: _Optional[_Union[PlanResponse, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[DeviceChange, _Mapping]]] = ..., frontier: _Optional[_Iterable[_Union[FrontierPoint, _Mapping]]] = ..., max_batch: _Optional[_Union[MaxBatch, _Mapping]] = ..., solve_seconds: _Optional[float] = ...) -> None: ...

class PlanReplicasRequest(_message.Message):
    __slots__ = ("base", "time_limit_seconds", "replica_counts")
    BASE_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COUNTS_FIELD_NUMBER: _ClassVar[int]
    base: PlanRequest
    time_limit_seconds: float
    replica_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, base: _Optional[_Union[PlanRequest, _Mapping]] = ..., time_limit_seconds: _Optional[float] = ..., replica_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ReplicaPlan(_message.Message):
    __slots__ = ("devices", "batch_size", "plan")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[ClusterDevice]
    batch_size: int
    plan: PlanResponse
    def __init__(self, devices: _Optional[_Iterable[_Union[ClusterDevice, _Mapping]]] = ..., batch_size: _Optional[int] = ..., plan: _Optional[_Union[PlanResponse, _Mapping]] = ...) -> None: ...

class ReplicaCount(_message.Message):
    __slots__ = ("replicas", "feasible", "throughput_tokens_per_s", "reason")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    replicas: int
    feasible: bool
    throughput_tokens_per_s: float
    reason: str
    def __init__(self, replicas: _Optional[int] = ..., feasible: _Optional[bool] = ..., throughput_tokens_per_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanReplicasResponse(_message.Message):
    __slots__ = ("replicas", "throughput_tokens_per_s", "pipeedge_tokens_per_s", "optimality_gap", "tried", "solve_seconds")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PIPEEDGE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    OPTIMALITY_GAP_FIELD_NUMBER: _ClassVar[int]
    TRIED_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaPlan]
    throughput_tokens_per_s: float
    pipeedge_tokens_per_s: float
    optimality_gap: float
    tried: _containers.RepeatedCompositeFieldContainer[ReplicaCount]
    solve_seconds: float
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaPlan, _Mapping]]] = ..., throughput_tokens_per_s: _Optional[float] = ..., pipeedge_tokens_per_s: _Optional[float] = ..., optimality_gap: _Optional[float] = ..., tried: _Optional[_Iterable[_Union[ReplicaCount, _Mapping]]] = ..., solve_seconds: _Optional[float] = ...) -> None: ...
