"""Real stage servers on loopback (port 0): a mesh of tiny models equals Hugging Face generate, and
every bad input gets its precise status while the servers keep serving."""

from __future__ import annotations

import itertools
import random

import grpc
import pytest
import tiny_models
import torch
from tiny_models import build_checkpoint, reference_greedy

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.api.stage.v1 import stage_pb2
from pqmesh.stage_client import StageClient
from pqmesh.stage_wire import left_pad
from stage_server.config import StageConfig
from stage_server.main import serve

PREFILL, DECODE = tensor_pb2.PHASE_PREFILL, tensor_pb2.PHASE_DECODE
ROLES = {(True, True): stage_pb2.ROLE_ONLY, (True, False): stage_pb2.ROLE_FIRST,
         (False, True): stage_pb2.ROLE_LAST, (False, False): stage_pb2.ROLE_MIDDLE}


def start_stages(model_root, count, budget=1 << 30):
    stages = []
    for _ in range(count):
        config = StageConfig("127.0.0.1:0", tiny_models.DEVICE, budget, model_root, queue_depth=4, log_level="warning")
        server, port, servicer = serve(config)
        stages.append((server, StageClient(f"127.0.0.1:{port}"), servicer))
    return stages


def load_mesh(clients, model_id, cuts, plan_id="plan-a", max_sequences=8, max_tokens=64, bits=None, total=4):
    replies = []
    for i, client in enumerate(clients):
        start, end = cuts[i], cuts[i + 1]
        request = stage_pb2.LoadShardRequest(
            plan_id=plan_id, model_id=model_id, layers=tensor_pb2.LayerRange(start=start, end=end),
            bits=(bits or [16] * (end - start)), role=ROLES[(start == 0, end == total)],
            max_sequences=max_sequences, max_tokens_per_sequence=max_tokens,
            next_hop=clients[i + 1].address if i + 1 < len(clients) else "",
            dtype="float32",  # the references are fp32 (a GPU stage would default to float16)
        )
        replies.append(client.load_shard(request))
    return replies


def mesh_greedy(first: StageClient, plan_id, prompts, new_tokens, prefill_mb, decode_mb, timings=None):
    """A minimal driver: prefill micro-batches, then regrouped decode micro-batches, all in flight."""
    stream, ids = first.forward(), itertools.count()
    slots = list(range(len(prompts)))
    lengths = {s: len(prompts[s]) for s in slots}
    out = {s: [] for s in slots}
    pending, prefilled, finished = {}, 0, 0
    for start in range(0, len(slots), prefill_mb):
        group = slots[start:start + prefill_mb]
        batch, group_lengths = left_pad([prompts[s] for s in group])
        pending[mb := next(ids)] = (PREFILL, group)
        stream.send_batch(plan_id, mb, PREFILL, group, group_lengths, batch)

    def send_decode(group):
        pending[mb := next(ids)] = (DECODE, group)
        stream.send_batch(
            plan_id, mb, DECODE, group, [lengths[s] for s in group], torch.tensor([[out[s][-1]] for s in group])
        )
        for s in group:
            lengths[s] += 1

    decode_groups = [slots[i:i + decode_mb] for i in range(0, len(slots), decode_mb)]
    for reply in stream.responses:
        if timings is not None:
            timings.append(reply)
        phase, group = pending.pop(reply.micro_batch_id)
        assert list(reply.slots) == group
        for s, token in zip(reply.slots, reply.token_ids):
            out[s].append(token)
        if phase == PREFILL:
            prefilled += len(group)
            if prefilled == len(slots):
                for g in decode_groups:
                    send_decode(g) if new_tokens > 1 else None
                if new_tokens == 1:
                    break
        elif len(out[group[0]]) < new_tokens:
            send_decode(group)
        else:
            finished += 1
            if finished == len(decode_groups):
                break
    stream.close()
    return [out[s] for s in slots]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    models = {family: build_checkpoint(family, root / f"tiny-{family}") for family in ("llama", "opt", "bloom")}
    return root, models


@pytest.fixture(scope="module")
def mesh(model_root):
    root, _ = model_root
    stages = start_stages(root, 3)
    yield [client for _, client, _ in stages]
    for server, client, servicer in stages:
        client.close()
        server.stop(None)
        servicer.worker.stop()


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_three_stage_mesh_equals_hf_generate(model_root, mesh, family):
    _, models = model_root
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (4, 9, 2, 7, 5)]
    load_mesh(mesh, f"tiny-{family}", [0, 1, 3, 4], plan_id=f"plan-{family}")
    timings = []
    got = mesh_greedy(mesh[0], f"plan-{family}", prompts, 12, prefill_mb=2, decode_mb=5, timings=timings)
    assert got == reference_greedy(models[family], prompts, 12)
    assert all(len(t.stages) == 3 and all(s.compute_ns > 0 for s in t.stages) for t in timings)
    assert [(s.layers.start, s.layers.end) for s in timings[0].stages] == [(0, 1), (1, 3), (3, 4)]
    info = mesh[1].info()
    assert (info.plan_id, info.layers.start, info.layers.end, info.role) == (
        f"plan-{family}",
        1,
        3,
        stage_pb2.ROLE_MIDDLE,
    )
    assert info.kv_slots_used == 5 and info.micro_batches_done == 3 + 11
    assert all(c.release(f"plan-{family}", range(5)) == 5 for c in mesh)


def expect_stream_error(first, send_args, code, match):
    stream = first.forward()
    stream.send_batch(*send_args)
    stream.close()
    with pytest.raises(grpc.RpcError) as caught:
        list(stream.responses)
    assert caught.value.code() == code, caught.value.details()
    assert match in caught.value.details()


def test_bad_micro_batches_get_precise_status_and_mesh_keeps_serving(model_root, mesh):
    _, models = model_root
    load_mesh(mesh, "tiny-llama", [0, 2, 3, 4], plan_id="plan-b", max_sequences=2, max_tokens=6)
    ids, lengths = left_pad([[5, 6, 7]])
    first = mesh[0]
    expect_stream_error(
        first,
        ("plan-b", 1, PREFILL, [2], lengths, ids),
        grpc.StatusCode.INVALID_ARGUMENT,
        "outside this shard's KV cache",
    )
    expect_stream_error(
        first,
        ("plan-b", 2, PREFILL, [0], [7], torch.ones(1, 7, dtype=torch.long)),
        grpc.StatusCode.OUT_OF_RANGE,
        "exceeds the KV capacity",
    )
    expect_stream_error(
        first,
        ("plan-b", 3, PREFILL, [0], lengths, ids.float()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expects int64 token ids",
    )
    expect_stream_error(
        first, ("plan-x", 4, PREFILL, [0], lengths, ids), grpc.StatusCode.FAILED_PRECONDITION, "not 'plan-x'"
    )
    expect_stream_error(
        first,
        ("plan-b", 5, DECODE, [1], [3], torch.tensor([[4]])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "hold [0] tokens",
    )
    # an error deep in the pipeline comes back up with its own status, naming the stage
    assert mesh_greedy(first, "plan-b", [[5, 6, 7]], 1, 1, 1) == [reference_greedy(models["llama"], [[5, 6, 7]], 1)[0]]
    mesh[2].release("plan-b", [0])
    expect_stream_error(
        first, ("plan-b", 6, DECODE, [0], [3], torch.tensor([[4]])), grpc.StatusCode.FAILED_PRECONDITION, "next stage"
    )
    # the servers still answer good requests
    for client in mesh:
        client.release("plan-b", [0, 1])
    assert mesh_greedy(first, "plan-b", [[5, 6, 7]], 3, 1, 1) == reference_greedy(models["llama"], [[5, 6, 7]], 3)


def test_load_shard_refusals(model_root):
    root, _ = model_root
    (server, client, servicer), = start_stages(root, 1, budget=50_000)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            load_mesh([client], "tiny-llama", [0, 4], max_sequences=64, max_tokens=128)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "memory budget is 50000 bytes: short by" in caught.value.details()
        assert client.info().memory_used_bytes == 0  # refused before allocating
        for model_id, code in [
            ("../tiny-llama", grpc.StatusCode.INVALID_ARGUMENT),
            ("nope", grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                load_mesh([client], model_id, [0, 4])
            assert caught.value.code() == code
        request = stage_pb2.LoadShardRequest(
            plan_id="p",
            model_id="tiny-llama",
            layers=tensor_pb2.LayerRange(start=0, end=2),
            bits=[16, 16],
            role=stage_pb2.ROLE_LAST,
            max_sequences=1,
            max_tokens_per_sequence=4,
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.load_shard(request)
        assert "make a first stage, not last" in caught.value.details()
    finally:
        client.close()
        server.stop(None)
        servicer.worker.stop()


def test_reported_bytes_match_prediction(model_root, mesh):
    replies = load_mesh(mesh, "tiny-opt", [0, 1, 3, 4], plan_id="plan-c", max_sequences=3, max_tokens=16)
    for reply, (start, end) in zip(replies, [(0, 1), (1, 3), (3, 4)]):
        assert reply.total_bytes == reply.weight_bytes + reply.kv_cache_bytes  # 16-bit: no workspace
        assert reply.kv_cache_bytes == 2 * (end - start) * 3 * 16 * 64 * 4


def test_mixed_bits_shard_generates_and_matches_its_memory_prediction(model_root, mesh):
    root, _ = model_root
    bits = [[8, 4], [3], [2]]
    replies = []
    cuts = [0, 2, 3, 4]
    for i, client in enumerate(mesh):
        start, end = cuts[i], cuts[i + 1]
        replies.append(client.load_shard(stage_pb2.LoadShardRequest(
            plan_id="plan-q", model_id="tiny-llama", layers=tensor_pb2.LayerRange(start=start, end=end),
            bits=bits[i], role=ROLES[(start == 0, end == 4)], max_sequences=2, max_tokens_per_sequence=16,
            next_hop=mesh[i + 1].address if i + 1 < 3 else "", group_size=32, dtype="float32")))
    tokens = mesh_greedy(mesh[0], "plan-q", [[5, 6, 7, 8], [9, 10]], 6, 2, 2)
    assert [len(t) for t in tokens] == [6, 6]
    from pqmesh.model.loading import load_config
    from stage_server.quantized import predict_shard_weight_bytes

    config = load_config(root / "tiny-llama")
    for reply, (start, end), b in zip(replies, zip(cuts, cuts[1:]), bits):
        predicted = predict_shard_weight_bytes(config, start, end, b, 32, torch.float32)
        assert abs(reply.weight_bytes - predicted) <= 0.03 * predicted, (start, end, reply.weight_bytes, predicted)


def test_loading_the_same_shard_under_a_new_plan_keeps_it(model_root, mesh):
    """A re-plan that moves layers [1, 4) from one stage to another: the first stage is asked for the
    same shard under a new plan id and next hop, keeps its weights, frees its slots, and the new
    pipeline still equals Hugging Face greedy generation."""
    _, models = model_root
    a, b, c = mesh
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    reference = reference_greedy(models["llama"], prompts, 6)
    first = load_mesh([a, b], "tiny-llama", [0, 1, 4], plan_id="plan-keep-1", max_tokens=40)
    assert mesh_greedy(a, "plan-keep-1", prompts, 6, 2, 3) == reference
    assert a.info().kv_slots_used == 3
    second = load_mesh([a, c], "tiny-llama", [0, 1, 4], plan_id="plan-keep-2", max_tokens=40)
    assert [r.kept for r in first] == [False, False]
    assert [r.kept for r in second] == [True, False]  # c held another shard: it loads
    assert second[0].total_bytes == first[0].total_bytes
    info = a.info()
    assert (info.plan_id, info.kv_slots_used, info.micro_batches_done) == ("plan-keep-2", 0, 0)
    assert mesh_greedy(a, "plan-keep-2", prompts, 6, 2, 3) == reference
    third = load_mesh([a, c], "tiny-llama", [0, 1, 4], plan_id="plan-keep-3", max_sequences=4, max_tokens=40)
    assert [r.kept for r in third] == [False, False]  # another KV capacity: loaded again
