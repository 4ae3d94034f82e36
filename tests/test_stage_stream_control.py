"""Slot release in band and cancelled streams, on real stage servers on loopback.

- A micro-batch's header frees ``release_slots`` on every stage before that micro-batch runs, so a
  finished sequence's slot can be reused by the very next micro-batch with no Release call.
- A Forward stream that the caller cancels drops the micro-batches still queued for it on the
  stage: they never run (and so allocate nothing).
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from test_stage_server import load_mesh, start_stages
from tiny_models import build_checkpoint, reference_greedy

from pqmesh.api.common.v1 import tensor_pb2
from pqmesh.stage_wire import left_pad, micro_batch_header

PREFILL = tensor_pb2.PHASE_PREFILL


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = build_checkpoint("llama", root / "tiny-llama")
    stages = start_stages(root, 2)
    clients = [client for _, client, _ in stages]
    yield model, clients
    for server, client, servicer in stages:
        client.close()
        server.stop(None)
        servicer.worker.stop()


def prefill(stream, plan_id, batch_id, slot, prompt, release=()):
    ids, lengths = left_pad([prompt])
    stream.send(micro_batch_header(plan_id, batch_id, PREFILL, [slot], lengths, release_slots=release), ids)


def test_release_slots_free_on_every_stage_before_the_micro_batch_runs(mesh):
    model, clients = mesh
    load_mesh(clients, "tiny-llama", [0, 2, 4], plan_id="plan-release", max_sequences=1)
    before = [c.info().slots_released_in_band for c in clients]
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    stream = clients[0].forward()
    prefill(stream, "plan-release", 0, 0, prompts[0])
    first = next(stream.responses)
    prefill(stream, "plan-release", 1, 0, prompts[1], release=[0])  # reuses the only slot at once
    second = next(stream.responses)
    stream.close()
    expected = reference_greedy(model, prompts, 1)
    assert [list(first.token_ids), list(second.token_ids)] == expected
    assert [c.info().slots_released_in_band - b for c, b in zip(clients, before)] == [1, 1]
    assert all(c.info().kv_slots_used == 1 for c in clients)  # the second prompt holds the slot

    refused = clients[0].forward()  # without release_slots the held slot is refused, naming the fix
    prefill(refused, "plan-release", 2, 0, prompts[0])
    with pytest.raises(grpc.RpcError) as caught:
        next(refused.responses)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "release it first" in caught.value.details()


def test_a_cancelled_stream_drops_its_queued_micro_batches_on_every_stage(mesh):
    _, clients = mesh
    slots = 48
    # the second stage holds 3 of 4 layers: it falls behind, so micro-batches queue up on it
    load_mesh(clients, "tiny-llama", [0, 1, 4], plan_id="plan-cancel", max_sequences=slots, max_tokens=600)
    before = [c.info() for c in clients]
    stream = clients[0].forward()
    prompt = list(torch.randint(3, 250, (512,)).tolist())  # long prefills: each takes a while on a CPU
    for i in range(slots):
        prefill(stream, "plan-cancel", i, i, prompt)
    next(stream.responses)  # the stages are working through their queues
    stream.cancel()
    at_cancel = [c.info().micro_batches_done for c in clients]
    settled = wait_until_settled(clients)
    ran_after = [s.micro_batches_done - c for s, c in zip(settled, at_cancel)]
    dropped = [s.micro_batches_dropped - b.micro_batches_dropped for s, b in zip(settled, before)]
    # each stage finishes at most the micro-batch it was running (and one that was being handed over)
    assert all(n <= 2 for n in ran_after), (at_cancel, ran_after, dropped)
    assert sum(dropped) >= 1, (at_cancel, ran_after, dropped)  # queued micro-batches were dropped, not run
    if at_cancel[0] - at_cancel[1] >= 3:  # the second stage had a queue (on a busy host it may not have had one)
        # its stream was cancelled by the first stage, not half-closed (which would have run its queue)
        assert dropped[1] >= 1, (at_cancel, ran_after, dropped)
    assert all(s.micro_batches_done < slots for s in settled)
    assert [s.kv_slots_used for s in settled] == [s.micro_batches_done for s in settled]  # only what ran holds slots


def wait_until_settled(clients, quiet_s: float = 0.6, timeout_s: float = 30.0):
    """GetInfo of every stage once none has finished a micro-batch for ``quiet_s`` seconds."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        infos = [c.info() for c in clients]
        done = [i.micro_batches_done for i in infos]
        if done != last:
            last, since = done, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return infos
        time.sleep(0.05)
    raise AssertionError(f"stages still running micro-batches after {timeout_s} s: {last}")
