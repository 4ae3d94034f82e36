from pqmesh.api.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_FIRST: _ClassVar[Role]
    ROLE_MIDDLE: _ClassVar[Role]
    ROLE_LAST: _ClassVar[Role]
    ROLE_ONLY: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_FIRST: Role
ROLE_MIDDLE: Role
ROLE_LAST: Role
ROLE_ONLY: Role

class LoadShardRequest(_message.Message):
    __slots__ = ("plan_id", "model_id", "layers", "bits", "role", "max_sequences", "max_tokens_per_sequence", "prefill_micro_batch", "decode_micro_batch", "next_hop", "dtype", "group_size")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    DECODE_MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    model_id: str
    layers: _tensor_pb2.LayerRange
    bits: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Bits]
    role: Role
    max_sequences: int
    max_tokens_per_sequence: int
    prefill_micro_batch: int
    decode_micro_batch: int
    next_hop: str
    dtype: str
    group_size: int
    def __init__(self, plan_id: _Optional[str] = ..., model_id: _Optional[str] = ..., layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., bits: _Optional[_Iterable[_Union[_tensor_pb2.Bits, str]]] = ..., role: _Optional[_Union[Role, str]] = ..., max_sequences: _Optional[int] = ..., max_tokens_per_sequence: _Optional[int] = ..., prefill_micro_batch: _Optional[int] = ..., decode_micro_batch: _Optional[int] = ..., next_hop: _Optional[str] = ..., dtype: _Optional[str] = ..., group_size: _Optional[int] = ...) -> None: ...

class LoadShardResponse(_message.Message):
    __slots__ = ("plan_id", "weight_bytes", "kv_cache_bytes", "total_bytes", "load_seconds", "kept")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    weight_bytes: int
    kv_cache_bytes: int
    total_bytes: int
    load_seconds: float
    kept: bool
    def __init__(self, plan_id: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ..., kept: _Optional[bool] = ...) -> None: ...

class MicroBatchHeader(_message.Message):
    __slots__ = ("plan_id", "micro_batch_id", "phase", "slots", "lengths", "sampling", "chunk_count", "release_slots")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    micro_batch_id: int
    phase: _tensor_pb2.Phase
    slots: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    sampling: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SamplingParams]
    chunk_count: int
    release_slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, plan_id: _Optional[str] = ..., micro_batch_id: _Optional[int] = ..., phase: _Optional[_Union[_tensor_pb2.Phase, str]] = ..., slots: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Iterable[_Union[_tensor_pb2.SamplingParams, _Mapping]]] = ..., chunk_count: _Optional[int] = ..., release_slots: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: MicroBatchHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[MicroBatchHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("plan_id", "micro_batch_id", "slots", "token_ids", "compute_ns", "queue_ns", "stages")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    micro_batch_id: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    compute_ns: int
    queue_ns: int
    stages: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, plan_id: _Optional[str] = ..., micro_batch_id: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., compute_ns: _Optional[int] = ..., queue_ns: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("layers", "compute_ns", "queue_ns")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    layers: _tensor_pb2.LayerRange
    compute_ns: int
    queue_ns: int
    def __init__(self, layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., compute_ns: _Optional[int] = ..., queue_ns: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("plan_id", "slots")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, plan_id: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("device", "memory_budget_bytes", "memory_used_bytes", "plan_id", "model_id", "layers", "role", "kv_slots_total", "kv_slots_used", "micro_batches_done", "tokens_done", "micro_batches_dropped", "slots_released_in_band", "slots_released_by_rpc")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_RELEASED_IN_BAND_FIELD_NUMBER: _ClassVar[int]
    SLOTS_RELEASED_BY_RPC_FIELD_NUMBER: _ClassVar[int]
    device: str
    memory_budget_bytes: int
    memory_used_bytes: int
    plan_id: str
    model_id: str
    layers: _tensor_pb2.LayerRange
    role: Role
    kv_slots_total: int
    kv_slots_used: int
    micro_batches_done: int
    tokens_done: int
    micro_batches_dropped: int
    slots_released_in_band: int
    slots_released_by_rpc: int
    def __init__(self, device: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., plan_id: _Optional[str] = ..., model_id: _Optional[str] = ..., layers: _Optional[_Union[_tensor_pb2.LayerRange, _Mapping]] = ..., role: _Optional[_Union[Role, str]] = ..., kv_slots_total: _Optional[int] = ..., kv_slots_used: _Optional[int] = ..., micro_batches_done: _Optional[int] = ..., tokens_done: _Optional[int] = ..., micro_batches_dropped: _Optional[int] = ..., slots_released_in_band: _Optional[int] = ..., slots_released_by_rpc: _Optional[int] = ...) -> None: ...
