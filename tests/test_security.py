"""TLS, mutual TLS, bearer tokens and client identities on real servers with certificates made at
test time by openssl (tests/tls_certs.py); model ids that try to leave --model-root; no pickle.

Observed statuses here are the ones docs/RELIABILITY.md lists."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_coordinator_e2e import mixed_prompts, plan_for
from tiny_models import build_checkpoint, reference_greedy
from tls_certs import make_pki

from cli.main import main as cli
from coordinator.config import CoordinatorConfig
from coordinator.main import serve as serve_coordinator
from planner.main import PlannerConfig
from planner.main import parse_args as planner_args
from planner.main import start as start_planner
from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from pqmesh.api.planner.v1 import planner_pb2, planner_pb2_grpc
from pqmesh.api.stage.v1 import stage_pb2, stage_pb2_grpc
from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.grpc_server import channel
from stage_server.config import StageConfig
from stage_server.main import serve as serve_stage
from stage_server.runtime import StageRuntime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, build_checkpoint("llama", root / "tiny-llama")


def secure_stage(pki, root, forward_cns=("stage",)):
    config = StageConfig("127.0.0.1:0", "cpu", 1 << 30, root, 4, "warning", credentials=pki.server(),
                         allowed_client_cns=("coordinator",), allowed_forward_cns=tuple(forward_cns))
    server, port, servicer = serve_stage(config)
    return server, f"127.0.0.1:{port}", servicer


@pytest.fixture(scope="module")
def stage(pki, models):
    server, address, servicer = secure_stage(pki, models[0])
    yield address
    server.stop(None)
    servicer.worker.stop()


def load_request(plan_id="plan-sec", next_hop="", start=0, end=4):
    role = {(True, True): stage_pb2.ROLE_ONLY, (True, False): stage_pb2.ROLE_FIRST,
            (False, True): stage_pb2.ROLE_LAST}[(start == 0, end == 4)]
    return stage_pb2.LoadShardRequest(
        plan_id=plan_id,
        model_id="tiny-llama",
        layers=tensor_pb2.LayerRange(start=start, end=end),
        bits=[16] * (end - start),
        role=role,
        max_sequences=2,
        max_tokens_per_sequence=16,
        next_hop=next_hop,
    )


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def stage_stub(address, credentials):
    return stage_pb2_grpc.StageServiceStub(channel(address, credentials))


# -- mutual TLS, tokens and identities on a stage -----------------------------------------------------
def test_coordinator_identity_with_token_may_load_forward_and_release(pki, stage):
    stub = stage_stub(stage, pki.client(pki.coordinator))
    assert stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=10).device == "cpu"
    reply = stub.LoadShard(load_request(), timeout=60)
    assert reply.total_bytes > 0
    header = stage_pb2.MicroBatchHeader(plan_id="plan-sec", micro_batch_id=7, phase=tensor_pb2.PHASE_PREFILL,
                                        slots=[0], lengths=[3])
    from stage_server.streaming import micro_batch_requests
    replies = list(stub.Forward(micro_batch_requests(header, torch.tensor([[5, 6, 7]]), "input_ids"), timeout=30))
    assert [r.micro_batch_id for r in replies] == [7] and len(replies[0].token_ids) == 1
    assert stub.Release(stage_pb2.ReleaseRequest(plan_id="plan-sec", slots=[0]), timeout=10).released == 1


@pytest.mark.parametrize("who", ["no client certificate", "stranger CA", "plaintext", "client trusts another CA"])
def test_handshake_refuses_clients_without_a_mesh_certificate(pki, stage, who):
    credentials = {
        "no client certificate": pki.client(None),
        "stranger CA": pki.client(pki.stranger),
        "plaintext": None,
        "client trusts another CA": pki.client(pki.coordinator, ca=pki.stranger_ca),
    }[who]
    code, details = code_of(lambda: stage_stub(stage, credentials).GetInfo(stage_pb2.GetInfoRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE, details


@pytest.mark.parametrize("method", ["LoadShard", "Release", "Forward"])
def test_right_ca_but_cn_not_allowed_is_permission_denied(pki, stage, method):
    stub = stage_stub(stage, pki.client(pki.mallory))
    assert stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=10).device == "cpu"  # read-only: open to the CA
    calls = {
        "LoadShard": lambda: stub.LoadShard(load_request(), timeout=10),
        "Release": lambda: stub.Release(stage_pb2.ReleaseRequest(plan_id="plan-sec", slots=[0]), timeout=10),
        "Forward": lambda: list(stub.Forward(iter([stage_pb2.ForwardRequest()]), timeout=10)),
    }
    code, details = code_of(calls[method])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "mallory" in details and "coordinator" in details, details


def test_stage_cn_may_forward_but_not_load(pki, stage):
    stub = stage_stub(stage, pki.client(pki.stage))
    code, details = code_of(lambda: stub.LoadShard(load_request(), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    # Forward gets past the identity check: the stream's own content is what fails here
    code, details = code_of(lambda: list(stub.Forward(iter([stage_pb2.ForwardRequest()]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


@pytest.mark.parametrize("token", ["missing", "wrong", "not bearer"])
def test_token_missing_or_wrong_is_unauthenticated_but_health_answers(pki, stage, token, tmp_path):
    if token == "missing":
        credentials = pki.client(pki.coordinator, token=False)
        chan = channel(stage, credentials)
    else:
        credentials = pki.client(pki.coordinator, token=False)
        value = "Bearer " + "x" * 40 if token == "wrong" else pki.token
        chan = grpc.intercept_channel(channel(stage, credentials), _Metadata(("authorization", value)))
    stub = stage_pb2_grpc.StageServiceStub(chan)
    for call in (lambda: stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5),
                 lambda: stub.LoadShard(load_request(), timeout=5),
                 lambda: list(stub.Forward(iter([stage_pb2.ForwardRequest()]), timeout=5))):
        code, details = code_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
        assert "token" in details
    health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, pair):
        self.pair = pair

    def _with(self, details):
        from pqmesh.security import _CallDetails
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self.pair],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with(details), request_iterator)


# -- start-up checks ----------------------------------------------------------------------------------
def test_flags_read_files_at_start_and_name_the_bad_one(pki, tmp_path, capsys):
    base = ["--model-root", str(tmp_path), "--listen", "127.0.0.1:0"]
    cases = [
        (
            ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki.stage.key)],
            "--tls-cert .*nope.pem: no such file",
        ),
        (["--tls-cert", str(pki.stage.cert)], "--tls-cert and --tls-key go together"),
        (
            ["--tls-cert", str(pki.stage.cert), "--tls-key", str(pki.token_file)],
            "--tls-key .* is not a PEM private key",
        ),
        (["--tls-ca", str(pki.ca)], "--tls-ca .*needs --tls-cert"),
        (["--allowed-client-cn", "coordinator"], "need mutual TLS"),
        (["--auth-token-file", str(tmp_path)], "is a directory"),
    ]
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    cases.append((["--auth-token-file", str(short)], "use at least 16"))
    for flags, message in cases:
        with pytest.raises(SystemExit):
            StageConfig.from_args(base + flags)
        assert re.search(message, capsys.readouterr().err), (flags, message)
    good = StageConfig.from_args(base + ["--tls-cert", str(pki.stage.cert), "--tls-key", str(pki.stage.key),
                                         "--tls-ca", str(pki.ca), "--auth-token-file", str(pki.token_file),
                                         "--allowed-client-cn", "coordinator", "--allowed-forward-cn", "stage"])
    assert good.credentials.mutual and good.credentials.token == pki.token
    assert good.allowed_methods()["/pqmesh.stage.v1.StageService/Forward"] == ("coordinator", "stage")
    with pytest.raises(SystemExit):
        planner_args(["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path), "--tls-key", str(pki.stage.key)])
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_planner_serves_tls_with_token(pki, tmp_path):
    server, port, _ = start_planner(
        PlannerConfig("127.0.0.1:0", tmp_path, "warning", credentials=pki.server(mutual=False))
    )
    try:
        address = f"127.0.0.1:{port}"
        ok = planner_pb2_grpc.PlannerServiceStub(channel(address, pki.client(None)))
        assert ok.ListDevices(planner_pb2.ListDevicesRequest(), timeout=10) is not None
        no_token = planner_pb2_grpc.PlannerServiceStub(channel(address, pki.client(None, token=False)))
        code, _ = code_of(lambda: no_token.ListDevices(planner_pb2.ListDevicesRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        plain = planner_pb2_grpc.PlannerServiceStub(channel(address))
        code, _ = code_of(lambda: plain.ListDevices(planner_pb2.ListDevicesRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        # `pqmesh profile --register` is a planner client too
        from planner.devices import builtin_profile
        from profiler.commands import register
        assert register(address, builtin_profile("t4", "t4-x"), pki.client(None)) is False
        with pytest.raises(InvalidArgument, match="UNAUTHENTICATED"):
            register(address, builtin_profile("t4", "t4-y"), pki.client(None, token=False))
    finally:
        server.stop(None)


# -- the whole mesh with mutual TLS -------------------------------------------------------------------
def test_coordinator_drives_a_two_stage_mtls_mesh_and_clients_need_its_token(pki, models, tmp_path, capsys):
    root, model = models
    stages = [secure_stage(pki, root) for _ in range(2)]
    config = CoordinatorConfig(
        "127.0.0.1:0",
        tmp_path / "state",
        plan_for([a for _, a, _ in stages], 2, 2, [(0, 2), (2, 4)]),
        "tiny-llama",
        4,
        32,
        log_level="warning",
        credentials=pki.server(mutual=False),
        stage_credentials=pki.client(pki.coordinator),
    )
    coordinator = serve_coordinator(config)
    address = f"127.0.0.1:{coordinator.port}"
    try:
        prompts = mixed_prompts(6, seed=3)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel(address, pki.client(None)))
        request = coordinator_pb2.SubmitJobRequest(
            prompts=[coordinator_pb2.Prompt(token_ids=coordinator_pb2.TokenIds(ids=p)) for p in prompts],
            params=coordinator_pb2.GenerationParams(max_new_tokens=5))
        job = stub.SubmitJob(request, timeout=30).job_id
        final = list(stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job), timeout=60))[-1]
        assert final.state == coordinator_pb2.JOB_STATE_SUCCEEDED, final
        results = stub.GetResults(coordinator_pb2.GetResultsRequest(job_id=job), timeout=30).results
        assert [list(r.token_ids) for r in results] == reference_greedy(model, prompts, 5)

        tls = ["--coordinator", address, "--tls-ca", str(pki.ca)]
        assert cli(["jobs", *tls, "--auth-token-file", str(pki.token_file)]) == 0
        assert job in capsys.readouterr().out
        assert cli(["jobs", *tls]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert cli(["jobs", *tls, "--auth-token-file", str(tmp_path / "missing")]) == 2
        assert "no such file" in capsys.readouterr().err
    finally:
        coordinator.stop(grace=None)
        for server, _, servicer in stages:
            server.stop(None)
            servicer.worker.stop()


def test_a_stage_refuses_forward_from_a_stage_identity_it_does_not_allow(pki, models, tmp_path):
    """The second stage allows only the coordinator: the chained stream from stage 1 is refused, and
    the refusal comes back up the first stage's stream with its status."""
    root, _ = models
    first, second = secure_stage(pki, root), secure_stage(pki, root, forward_cns=())
    try:
        coordinator = stage_stub(first[1], pki.client(pki.coordinator))
        stage_stub(second[1], pki.client(pki.coordinator)).LoadShard(load_request("p2", start=2, end=4), timeout=60)
        coordinator.LoadShard(load_request("p2", next_hop=second[1], start=0, end=2), timeout=60)
        from stage_server.streaming import micro_batch_requests
        header = stage_pb2.MicroBatchHeader(plan_id="p2", micro_batch_id=1, phase=tensor_pb2.PHASE_PREFILL,
                                            slots=[0], lengths=[2])
        code, details = code_of(lambda: list(coordinator.Forward(
            micro_batch_requests(header, torch.tensor([[5, 6]]), "input_ids"), timeout=30)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "next stage" in details, details
    finally:
        for server, _, servicer in (first, second):
            server.stop(None)
            servicer.worker.stop()


# -- model ids stay under --model-root ----------------------------------------------------------------
def test_model_ids_cannot_leave_the_model_root(models, tmp_path):
    root, _ = models
    outside = tmp_path / "outside"
    build_checkpoint("llama", outside / "elsewhere", layers=1)
    link = root / "linked-out"
    if not link.exists():
        link.symlink_to(outside / "elsewhere", target_is_directory=True)
    inside_link = root / "linked-in"
    if not inside_link.exists():
        inside_link.symlink_to(root / "tiny-llama", target_is_directory=True)
    runtime = StageRuntime("cpu", 1 << 30, root)
    for bad in ["..", ".", "", "../outside/elsewhere", str(outside / "elsewhere"), "a/../tiny-llama",
                "tiny-llama/", "..\\x", "tiny\x00llama", "tiny-llama\n", "linked-out"]:
        with pytest.raises(InvalidArgument):
            runtime.model_dir(bad)
    with pytest.raises(NotFound):
        runtime.model_dir("no-such-model")
    assert runtime.model_dir("tiny-llama") == root.resolve() / "tiny-llama"
    assert runtime.model_dir("linked-in").resolve() == (root / "tiny-llama").resolve()


def test_no_pickle_on_the_wire_or_on_disk():
    """Checkpoints are safetensors, tensors cross the wire as raw bytes (pqmesh/codec.py): nothing in
    the packages may import pickle or call torch.load without weights_only=True."""
    offenders = []
    for package in ("pqmesh", "stage_server", "coordinator", "planner"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"\b(c?pickle|dill|marshal|shelve|joblib)\b", code) and "import" in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
                if re.search(r"\bpickle\.", code) or ("torch.load(" in code and "weights_only=True" not in code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
