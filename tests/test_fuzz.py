"""Property-based fuzzing of the three services on real servers: random and malformed requests
(every field over its whole range, unknown enum numbers, NaN, non-UTF-8 strings, raw random bytes,
tensors of the wrong dtype, shape or size) at every RPC. Every call must end, within its deadline,
with OK or a status other than UNKNOWN/INTERNAL; afterwards each service still answers a good
request correctly. Runs derandomized (the same examples every run), in well under a minute."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from fuzz_messages import call, check, integers, message, serialize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_coordinator_api import save_word_tokenizer
from test_coordinator_e2e import plan_for
from tiny_models import VOCAB, build_checkpoint, reference_greedy

from coordinator.config import CoordinatorConfig
from coordinator.jobs import _make_token
from coordinator.main import serve as serve_coordinator
from planner.main import PlannerConfig
from planner.main import start as start_planner
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.grpc_server import channel
from stage_server.config import StageConfig
from stage_server.main import serve as serve_stage
from stage_server.streaming import micro_batch_requests

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
PLANNER = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"]
STAGE = stage_pb2.DESCRIPTOR.services_by_name["StageService"]
COORDINATOR = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
PLAN_ID = "fuzz-plan"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = build_checkpoint("llama", root / "tiny-llama")
    save_word_tokenizer(root / "tiny-llama")
    return root, model


def raw_or_message(data, method, hints, fix=None) -> list[bytes]:
    """One request's bytes: usually a random message (``fix`` may adjust it), sometimes random bytes."""
    if data.draw(st.integers(0, 5)) == 0:
        return [data.draw(st.binary(max_size=300))]
    msg = data.draw(message(method.input_type, hints))
    if fix is not None:
        fix(msg)
    return [serialize(msg)]


# -- planner ------------------------------------------------------------------------------------------
def _short_solve(request) -> None:
    """A valid plan request would solve for its whole (finite) time limit; keep those short."""
    if isinstance(request, planner_pb2.PlanRequest) and math.isfinite(request.time_limit_seconds) \
            and request.time_limit_seconds > 0.5:
        request.time_limit_seconds = 0.5
    if isinstance(request, planner_pb2.PlanRequest) and request.time_limit_seconds == 0:
        request.time_limit_seconds = 0.5


PLANNER_HINTS = {"model_name": ["opt-13b", "llama-2-7b", "bloom-3b"], "device_type": ["t4", "v100-16g", "a100-40g"],
                 "name": ["t4-a", "gpu-x"], "count": [1, 2, 3], "batch_size": [1, 8, 32], "prompt_length": [16, 128],
                 "generation_length": [8, 32], "allowed_bits": [16, 8, 4]}


@st.composite
def plan_request(draw) -> list[bytes]:
    """A Plan request that names a real model, devices and a workload, so most of the time it gets
    past the first checks into the cost model and solver; every number still spans its type."""
    msg = draw(message(planner_pb2.PlanRequest.DESCRIPTOR, PLANNER_HINTS))
    msg.model_name = draw(st.sampled_from(PLANNER_HINTS["model_name"]))
    del msg.devices[:]
    for _ in range(draw(st.integers(1, 3))):
        msg.devices.add(device_type=draw(st.sampled_from(PLANNER_HINTS["device_type"])),
                        count=draw(st.one_of(st.integers(1, 4), integers(0, 2**32 - 1))))
    msg.workload.CopyFrom(
        planner_pb2.Workload(
            **{
                name: draw(st.one_of(st.sampled_from(PLANNER_HINTS[name]), integers(0, 2**32 - 1)))
                for name in ("batch_size", "prompt_length", "generation_length")
            }
        )
    )
    _short_solve(msg)
    return [serialize(msg)]


def test_planner_survives_random_requests(tmp_path):
    server, port, _ = start_planner(PlannerConfig("127.0.0.1:0", tmp_path, "warning"))
    chan = channel(f"127.0.0.1:{port}")
    try:
        @FUZZ
        @given(st.data())
        def fuzz(data):
            method = data.draw(st.sampled_from(list(PLANNER.methods)))
            if method.name == "Plan" and data.draw(st.booleans()):
                payload = data.draw(plan_request())
            else:
                payload = raw_or_message(data, method, PLANNER_HINTS, _short_solve)
            check(call(chan, method, payload, timeout=30), f"{method.name} {payload[0][:200]!r}")

        fuzz()
        stub = planner_pb2_grpc.PlannerServiceStub(chan)
        reply = stub.Plan(planner_pb2.PlanRequest(
            model_name="opt-13b", devices=[planner_pb2.ClusterDevice(device_type="a100-40g", count=2)],
            workload=planner_pb2.Workload(batch_size=8, prompt_length=128, generation_length=32),
            time_limit_seconds=5), timeout=60)
        assert len(reply.plan.stages) >= 1 and reply.plan.stages[-1].layers.end == 40
        stub.ListDevices(planner_pb2.ListDevicesRequest(), timeout=10)  # every stored profile still reads back
    finally:
        chan.close()
        server.stop(None)


# -- stage --------------------------------------------------------------------------------------------
DTYPES = ["int64", "int64", "int32", "float32", "float16", "bfloat16", "uint8", "bool", "", "complex64", "bogus"]


@st.composite
def micro_batch(draw) -> list[bytes]:
    """A header and tensor chunks that are each plausible but rarely agree with each other."""
    n = draw(st.integers(0, 4))
    slots = draw(
        st.lists(st.one_of(st.integers(0, 5), integers(0, 2**32 - 1)), min_size=n, max_size=n + draw(st.integers(0, 1)))
    )
    lengths = draw(
        st.lists(st.one_of(st.integers(0, 12), integers(0, 2**32 - 1)), min_size=max(n - 1, 0), max_size=n + 1)
    )
    header = stage_pb2.MicroBatchHeader(
        plan_id=draw(st.sampled_from([PLAN_ID, PLAN_ID, "other", ""])),
        micro_batch_id=draw(integers(0, 2**64 - 1)),
        phase=draw(st.sampled_from([1, 1, 2, 2, 0, 9])),
        slots=slots,
        lengths=lengths,
        sampling=draw(st.lists(message(tensor_pb2.SamplingParams.DESCRIPTOR), max_size=n + 1)),
    )
    dtype = draw(st.sampled_from(DTYPES))
    natural = [len(slots), max(lengths, default=1)] if draw(st.booleans()) else [len(slots), 1, 64]
    shape = draw(
        st.one_of(
            st.just(natural), st.lists(st.one_of(st.integers(0, 6), st.sampled_from([-1, 2**31, 2**40])), max_size=4)
        )
    )
    values = torch.tensor(draw(st.lists(st.one_of(st.integers(0, VOCAB - 1), integers(-2**63, 2**63 - 1)),
                                        min_size=1, max_size=1)) or [0], dtype=torch.int64)
    numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if 0 < numel <= 4096 and dtype in ("int64", "int32", "float32", "float16", "bfloat16", "uint8"):
        data = values.repeat(numel).to(getattr(torch, dtype)).view(torch.uint8).numpy().tobytes()
    elif numel == 0:
        data = b""
    else:
        data = draw(st.binary(max_size=64))
    declared = len(data) if draw(st.booleans()) else draw(st.sampled_from(
        [max(numel, 0) * 8, 2**40, 2**63, 0, len(data) + 1]))
    chunk = tensor_pb2.TensorChunk(name="input_ids", dtype=dtype, shape=[max(min(d, 2**62), -2**62) for d in shape],
                                   offset=draw(st.sampled_from([0, 0, 0, 5])), total_bytes=min(declared, 2**64 - 1),
                                   data=data)
    header.chunk_count = draw(st.sampled_from([1, 1, 0, 2, 2**32 - 1]))
    return [serialize(stage_pb2.ForwardRequest(header=header)), serialize(stage_pb2.ForwardRequest(chunk=chunk))]


@st.composite
def valid_micro_batch(draw) -> list[bytes]:
    """A well-formed micro-batch (distinct slots, consistent lengths, int64 ids) whose numbers still
    go wrong: token ids outside the vocabulary, decode before prefill, NaN or huge sampling settings."""
    slots = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    phase = draw(st.sampled_from([tensor_pb2.PHASE_PREFILL, tensor_pb2.PHASE_DECODE]))
    width = 1 if phase == tensor_pb2.PHASE_DECODE else draw(st.integers(1, 6))
    lengths = [
        draw(
            st.integers(0 if phase == tensor_pb2.PHASE_DECODE else 1, width if phase == tensor_pb2.PHASE_PREFILL else 8)
        )
        for _ in slots
    ]
    token = st.one_of(*[st.integers(0, VOCAB - 1)] * 8, st.sampled_from([-1, VOCAB, 2**63 - 1]))
    ids = torch.tensor([[draw(token) for _ in range(width)] for _ in slots], dtype=torch.int64)
    sampling = [tensor_pb2.SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.7, 1e-30, 1e30, math.nan, math.inf, -1.0])),
        top_k=draw(st.one_of(st.integers(0, 300), integers(0, 2**32 - 1))),
        top_p=draw(st.sampled_from([0.0, 0.9, 1.0, 1e-30, math.nan, 2.0])), seed=draw(integers(0, 2**64 - 1)))
        for _ in slots] if draw(st.booleans()) else []
    header = stage_pb2.MicroBatchHeader(
        plan_id=PLAN_ID,
        micro_batch_id=draw(st.integers(0, 100)),
        phase=phase,
        slots=slots,
        lengths=lengths,
        sampling=sampling,
    )
    return [serialize(m) for m in micro_batch_requests(header, ids, "input_ids")]


STAGE_HINTS = {
    "plan_id": [PLAN_ID],
    "model_id": ["tiny-llama"],
    "start": [0, 1, 2, 4],
    "end": [1, 2, 4, 5],
    "bits": [16, 8, 4],
    "max_sequences": [1, 4],
    "max_tokens_per_sequence": [16, 32],
    "group_size": [0, 32, 64],
    "dtype": ["float32", "bfloat16", "float16"],
    "slots": [0, 1, 2, 3],
}


def good_load(stub) -> None:
    stub.LoadShard(stage_pb2.LoadShardRequest(
        plan_id=PLAN_ID, model_id="tiny-llama", layers=tensor_pb2.LayerRange(start=0, end=4), bits=[16] * 4,
        role=stage_pb2.ROLE_ONLY, max_sequences=4, max_tokens_per_sequence=32), timeout=60)


def test_stage_survives_random_requests(models):
    root, model = models
    server, port, servicer = serve_stage(StageConfig("127.0.0.1:0", "cpu", 1 << 30, root, 4, "warning"))
    chan = channel(f"127.0.0.1:{port}")
    stub = stage_pb2_grpc.StageServiceStub(chan)
    good_load(stub)
    try:
        @FUZZ
        @given(st.data())
        def fuzz(data):
            method = data.draw(st.sampled_from([*STAGE.methods, *[STAGE.methods_by_name["Forward"]] * 4]))
            if method.name == "Forward":
                parts = data.draw(
                    st.lists(
                        st.one_of(
                            micro_batch(),
                            valid_micro_batch(),
                            valid_micro_batch(),
                            st.lists(
                                st.one_of(
                                    message(stage_pb2.ForwardRequest.DESCRIPTOR, STAGE_HINTS).map(serialize),
                                    st.binary(max_size=100),
                                ),
                                max_size=3,
                            ),
                        ),
                        min_size=1,
                        max_size=3,
                    )
                )
                payload = [piece for part in parts for piece in part]
            else:
                payload = raw_or_message(data, method, STAGE_HINTS)
            check(call(chan, method, payload, timeout=20), f"{method.name} {[p[:120] for p in payload]!r}")
            try:  # free the KV slots again, so later examples get past "slot in use" into the compute
                stub.Release(stage_pb2.ReleaseRequest(plan_id=PLAN_ID, slots=range(4)), timeout=10)
            except grpc.RpcError:
                pass  # a random LoadShard replaced or dropped the plan

        fuzz()
        assert stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=10).device == "cpu"
        good_load(stub)
        prompt = [5, 17, 99, 3]
        header = stage_pb2.MicroBatchHeader(plan_id=PLAN_ID, micro_batch_id=1, phase=tensor_pb2.PHASE_PREFILL,
                                            slots=[0], lengths=[len(prompt)])
        replies = list(stub.Forward(micro_batch_requests(header, torch.tensor([prompt]), "input_ids"), timeout=30))
        assert [list(r.token_ids) for r in replies] == reference_greedy(model, [prompt], 1)
    finally:
        chan.close()
        server.stop(None)
        servicer.worker.stop()


# -- coordinator --------------------------------------------------------------------------------------
def test_coordinator_survives_random_requests(models, tmp_path):
    root, model = models
    stage_server, stage_port, stage_servicer = serve_stage(
        StageConfig("127.0.0.1:0", "cpu", 1 << 30, root, 4, "warning")
    )
    config = CoordinatorConfig("127.0.0.1:0", tmp_path, plan_for([f"127.0.0.1:{stage_port}"], 2, 3, [(0, 4)]),
                               "tiny-llama", 4, 40, model_root=root, log_level="warning", max_pending_jobs=6,
                               max_prompts_per_job=50)
    coordinator = serve_coordinator(config)
    chan = channel(f"127.0.0.1:{coordinator.port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
    prompt = [5, 17, 99, 3]

    def run(prompts, new_tokens=3) -> tuple[str, list]:
        job = stub.SubmitJob(coordinator_pb2.SubmitJobRequest(
            prompts=[coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=p)) for p in prompts],
            params=coordinator_pb2.GenerationParams(max_new_tokens=new_tokens)), timeout=30).job_id
        final = list(stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=60))[-1]
        assert final.state == coordinator_pb2.JOB_STATE_SUCCEEDED, final
        return job, [
            list(r.token_ids)
            for r in stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job), timeout=30).results
        ]

    try:
        known, _ = run([prompt])
        hints = {
            "job_id": [known],
            "page_token": [_make_token(known, 0), _make_token("job-x", 0)],
            "ids": list(range(0, 8)) + [VOCAB - 1, VOCAB],
            "max_new_tokens": [1, 2, 3],
            "idempotency_key": ["k1", "k2"],
            "text": ["the cat sat", "w1 w2", " "],
        }

        @FUZZ
        @given(st.data())
        def fuzz(data):
            method = data.draw(st.sampled_from(list(COORDINATOR.methods)))
            payload = raw_or_message(data, method, hints)
            check(call(chan, method, payload, timeout=20, max_responses=2), f"{method.name} {payload[0][:200]!r}")

        fuzz()
        for job in stub.ListJobs(coordinator_pb2.ListJobsRequest(), timeout=10).jobs:
            stub.CancelJob(coordinator_pb2.CancelJobRequest(job_id=job.job_id), timeout=10)
        _, results = run([prompt, prompt[:2]], 4)
        assert results == reference_greedy(model, [prompt, prompt[:2]], 4)
    finally:
        chan.close()
        coordinator.stop(grace=None)
        stage_server.stop(None)
        stage_servicer.worker.stop()


# -- the cases the fuzzing found, kept as plain regressions -------------------------------------------
def test_found_cases_get_precise_statuses(models, tmp_path):
    """Each of these once ended INTERNAL or hung (see docs/RELIABILITY.md)."""
    root, _ = models
    planner, planner_port, _ = start_planner(PlannerConfig("127.0.0.1:0", tmp_path, "warning"))
    stage, stage_port, servicer = serve_stage(StageConfig("127.0.0.1:0", "cpu", 1 << 30, root, 4, "warning"))
    plans = planner_pb2_grpc.PlannerServiceStub(channel(f"127.0.0.1:{planner_port}"))
    stages = stage_pb2_grpc.StageServiceStub(channel(f"127.0.0.1:{stage_port}"))
    good_load(stages)
    workload = planner_pb2.Workload(batch_size=8, prompt_length=128, generation_length=32)
    a100 = [planner_pb2.ClusterDevice(device_type="a100-40g", count=2)]

    def plan(**fields):
        fields = {"model_name": "opt-13b", "devices": a100, "workload": workload, "time_limit_seconds": 1, **fields}
        return lambda: plans.Plan(planner_pb2.PlanRequest(**fields), timeout=20)

    def forward(tokens, phase=tensor_pb2.PHASE_PREFILL, lengths=None, sampling=(), chunk=None):
        tokens = torch.tensor(tokens)
        header = stage_pb2.MicroBatchHeader(plan_id=PLAN_ID, micro_batch_id=1, phase=phase, slots=[0],
                                            lengths=lengths or [tokens.shape[-1]], sampling=list(sampling))
        requests = list(micro_batch_requests(header, tokens, "input_ids"))
        if chunk is not None:
            requests[1] = stage_pb2.ForwardRequest(chunk=chunk)
        return lambda: list(stages.Forward(iter(requests), timeout=20))

    cases = {
        "raw bytes to RegisterDevice": (
            lambda: chan_raw(planner_port, "/pqmesh.planner.v1.PlannerService/RegisterDevice", b"\x00"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "device count 2^32-1 (hung)": (
            plan(devices=[planner_pb2.ClusterDevice(device_type="t4", count=2**32 - 1)]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "batch 2^32-1 (hung)": (
            plan(workload=planner_pb2.Workload(batch_size=2**32 - 1, prompt_length=8, generation_length=8)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "theta NaN (INTERNAL)": (plan(theta=math.nan), grpc.StatusCode.INVALID_ARGUMENT),
        "time limit NaN (accepted)": (plan(time_limit_seconds=math.nan), grpc.StatusCode.INVALID_ARGUMENT),
        "bandwidth NaN (accepted)": (
            plan(network=planner_pb2.Network(bandwidth_gbps=math.nan)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "4M-layer config (hung)": (
            plan(
                model_name=None,
                model_config_json='{"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, '
                '"num_hidden_layers": 4000000, "num_attention_heads": 4, "vocab_size": 10}',
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "token id = vocab (INTERNAL)": (forward([[1, 2, VOCAB]]), grpc.StatusCode.INVALID_ARGUMENT),
        "token id -1 (INTERNAL)": (forward([[-1, 2, 3]]), grpc.StatusCode.INVALID_ARGUMENT),
        "temperature NaN (INTERNAL)": (
            forward([[1, 2, 3]], sampling=[tensor_pb2.SamplingParams(temperature=math.nan)]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "decode of width 2 (INTERNAL)": (
            forward([[1, 2]], phase=tensor_pb2.PHASE_DECODE, lengths=[0]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "8 TiB declared tensor (MemoryError)": (
            forward(
                [[1]],
                chunk=tensor_pb2.TensorChunk(
                    name="input_ids", dtype="int64", shape=[1, 2**40], total_bytes=8 * 2**40, data=b"\0" * 8
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    }
    try:
        for name, (request, expected) in cases.items():
            code, details = None, ""
            try:
                request()
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
            assert code == expected, (name, code, details)
    finally:
        planner.stop(None)
        stage.stop(None)
        servicer.worker.stop()


def chan_raw(port: int, method: str, payload: bytes):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        return chan.unary_unary(method)(payload, timeout=10)
