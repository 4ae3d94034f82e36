from pqmesh.api.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_UPLOADING: _ClassVar[JobState]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_UPLOADING: JobState
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ERROR: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class RequestParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids", "chat", "jsonl_line", "custom_id", "params")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    JSONL_LINE_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    chat: ChatMessages
    jsonl_line: str
    custom_id: str
    params: RequestParams
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., jsonl_line: _Optional[str] = ..., custom_id: _Optional[str] = ..., params: _Optional[_Union[RequestParams, _Mapping]] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_new_tokens", "stop_on_eos", "sampling")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_EOS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_on_eos: bool
    sampling: _tensor_pb2.SamplingParams
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_on_eos: _Optional[bool] = ..., sampling: _Optional[_Union[_tensor_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("idempotency_key", "prompts", "params")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    params: GenerationParams
    def __init__(self, idempotency_key: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("job_id", "state", "sequences_total", "sequences_done", "tokens_generated", "tokens_per_second", "phase", "eta_seconds", "message", "predicted_seconds", "elapsed_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    sequences_total: int
    sequences_done: int
    tokens_generated: int
    tokens_per_second: float
    phase: _tensor_pb2.Phase
    eta_seconds: float
    message: str
    predicted_seconds: float
    elapsed_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., sequences_total: _Optional[int] = ..., sequences_done: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., phase: _Optional[_Union[_tensor_pb2.Phase, str]] = ..., eta_seconds: _Optional[float] = ..., message: _Optional[str] = ..., predicted_seconds: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class GetResultsRequest(_message.Message):
    __slots__ = ("job_id", "page_size", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    page_size: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("index", "token_ids", "text", "finish_reason", "custom_id", "prompt_tokens", "completion_tokens", "error", "error_code", "endpoint", "model")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    custom_id: str
    prompt_tokens: int
    completion_tokens: int
    error: str
    error_code: str
    endpoint: str
    model: str
    def __init__(self, index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., custom_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ..., endpoint: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class GetResultsResponse(_message.Message):
    __slots__ = ("results", "next_page_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    next_page_token: str
    def __init__(self, results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobSummary(_message.Message):
    __slots__ = ("job_id", "state", "idempotency_key", "sequences_total", "sequences_done", "tokens_generated", "submitted_at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    idempotency_key: str
    sequences_total: int
    sequences_done: int
    tokens_generated: int
    submitted_at: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., idempotency_key: _Optional[str] = ..., sequences_total: _Optional[int] = ..., sequences_done: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., submitted_at: _Optional[float] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSummary]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSummary, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("idempotency_key", "params", "content_digest")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    params: GenerationParams
    content_digest: str
    def __init__(self, idempotency_key: _Optional[str] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., content_digest: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job_id", "state", "prompts_received")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    prompts_received: int
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., prompts_received: _Optional[int] = ...) -> None: ...

class AppendPromptsRequest(_message.Message):
    __slots__ = ("job_id", "offset", "prompts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    offset: int
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    def __init__(self, job_id: _Optional[str] = ..., offset: _Optional[int] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ...) -> None: ...

class AppendPromptsResponse(_message.Message):
    __slots__ = ("prompts_received",)
    PROMPTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    prompts_received: int
    def __init__(self, prompts_received: _Optional[int] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("job_id", "prompts_total")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    prompts_total: int
    def __init__(self, job_id: _Optional[str] = ..., prompts_total: _Optional[int] = ...) -> None: ...

class StreamResultsRequest(_message.Message):
    __slots__ = ("job_id", "resume_from")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    resume_from: int
    def __init__(self, job_id: _Optional[str] = ..., resume_from: _Optional[int] = ...) -> None: ...

class MeshDevice(_message.Message):
    __slots__ = ("name", "address", "device_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    device_type: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., device_type: _Optional[str] = ...) -> None: ...

class ReplanMeshRequest(_message.Message):
    __slots__ = ("rejoin", "add", "force", "dry_run", "for_job")
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FOR_JOB_FIELD_NUMBER: _ClassVar[int]
    rejoin: _containers.RepeatedScalarFieldContainer[str]
    add: MeshDevice
    force: bool
    dry_run: bool
    for_job: str
    def __init__(self, rejoin: _Optional[_Iterable[str]] = ..., add: _Optional[_Union[MeshDevice, _Mapping]] = ..., force: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., for_job: _Optional[str] = ...) -> None: ...

class ReplanMeshResponse(_message.Message):
    __slots__ = ("switched", "old_plan_id", "new_plan_id", "old_predicted_tokens_per_s", "new_predicted_tokens_per_s", "old_devices", "new_devices", "rejoined", "message")
    SWITCHED_FIELD_NUMBER: _ClassVar[int]
    OLD_PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    OLD_PREDICTED_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NEW_PREDICTED_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    OLD_DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEW_DEVICES_FIELD_NUMBER: _ClassVar[int]
    REJOINED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    switched: bool
    old_plan_id: str
    new_plan_id: str
    old_predicted_tokens_per_s: float
    new_predicted_tokens_per_s: float
    old_devices: _containers.RepeatedScalarFieldContainer[str]
    new_devices: _containers.RepeatedScalarFieldContainer[str]
    rejoined: _containers.RepeatedScalarFieldContainer[str]
    message: str
    def __init__(self, switched: _Optional[bool] = ..., old_plan_id: _Optional[str] = ..., new_plan_id: _Optional[str] = ..., old_predicted_tokens_per_s: _Optional[float] = ..., new_predicted_tokens_per_s: _Optional[float] = ..., old_devices: _Optional[_Iterable[str]] = ..., new_devices: _Optional[_Iterable[str]] = ..., rejoined: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ...) -> None: ...
