"""Sliced execution of tiny random models of every family equals the full Hugging Face model."""

from __future__ import annotations

import random

import pytest
import tiny_models
import torch
from tiny_models import build_checkpoint, reference_greedy

from pqmesh.errors import FailedPrecondition, InvalidArgument, OutOfRange
from pqmesh.model import LocalPipeline, ModelShard
from pqmesh.stage_wire import left_pad

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "opt-350m-style", "bloom"]
CUTS = {1: [0, 4], 2: [0, 2, 4], 3: [0, 1, 3, 4]}
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = build_checkpoint(request.param, directory)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 11, 3, 8, 1, 6)]
    return directory, model, prompts, reference_greedy(model, prompts, NEW_TOKENS)


def pipeline(directory, cuts, max_slots=8, max_len=64) -> LocalPipeline:
    return LocalPipeline(
        [ModelShard.load(directory, a, b, max_slots=max_slots, max_len=max_len, device=tiny_models.DEVICE)
         for a, b in zip(cuts, cuts[1:])]
    )


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_tokens_equal_hf_generate(tiny, stages):
    directory, _, prompts, expected = tiny
    got = pipeline(directory, CUTS[stages]).generate_greedy(
        prompts, NEW_TOKENS, prefill_micro_batch=3, decode_micro_batch=6
    )
    assert got == expected
    assert len({tuple(t) for t in expected}) > 1, "degenerate reference: every prompt gave the same tokens"


@pytest.mark.parametrize("prefill_mb, decode_mb", [(2, 4), (4, 2), (1, 3)])
def test_regrouping_between_phases_keeps_tokens(tiny, prefill_mb, decode_mb):
    directory, _, prompts, expected = tiny
    got = pipeline(directory, CUTS[2]).generate_greedy(prompts[:4], NEW_TOKENS, prefill_mb, decode_mb)
    assert got == expected[:4]


@pytest.mark.parametrize("stages", [1, 3])
def test_prefill_logits_match_full_model(tiny, stages):
    directory, model, prompts, _ = tiny
    ids, lengths = left_pad(prompts)
    logits = pipeline(directory, CUTS[stages]).prefill(list(range(len(prompts))), ids, lengths, all_logits=True)
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.to(tiny_models.DEVICE)(torch.tensor([prompt], device=tiny_models.DEVICE)).logits[0]
        got = logits[row, width - len(prompt):].to(ref.device)
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel < 1e-5, f"prompt {row}: relative error {rel:.2e}"


def test_sharded_checkpoint_loads_the_same(tmp_path):
    model = build_checkpoint("llama", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompts = [[5, 9, 44], [7, 8, 9, 10, 11]]
    got = pipeline(tmp_path, CUTS[2]).generate_greedy(prompts, 8, 2, 2)
    assert got == reference_greedy(model, prompts, 8)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_stage_with_a_quarter_of_layers_reads_a_quarter_of_layer_bytes(tmp_path, family):
    model = build_checkpoint(family, tmp_path, layers=8)
    prefix = "model.layers." if family == "llama" else "transformer.h."
    layer_bytes = {
        i: sum(t.nbytes for n, t in model.state_dict().items() if n.startswith(f"{prefix}{i}.")) for i in range(8)
    }
    total = sum(t.nbytes for t in model.state_dict().values())
    shard = ModelShard.load(tmp_path, 2, 4, max_slots=1, max_len=8)
    quarter = layer_bytes[2] + layer_bytes[3]
    assert shard.weight_bytes() == quarter == shard.checkpoint_bytes_read
    assert abs(quarter / sum(layer_bytes.values()) - 0.25) < 0.01
    assert shard.weight_bytes() < 0.3 * total


def test_bad_inputs_get_precise_errors(tmp_path):
    build_checkpoint("llama", tmp_path)
    first = ModelShard.load(tmp_path, 0, 2, max_slots=2, max_len=6)
    later = ModelShard.load(tmp_path, 2, 4, max_slots=2, max_len=6)
    ids, lengths = left_pad([[3, 4, 5]])
    with pytest.raises(InvalidArgument, match="outside this shard's KV cache"):
        first.prefill([2], ids, lengths)
    with pytest.raises(InvalidArgument, match="expects int64 token ids"):
        first.prefill([0], ids.float(), lengths)
    with pytest.raises(InvalidArgument, match="hidden states"):
        later.prefill([0], torch.zeros(1, 3, 32), lengths)
    with pytest.raises(FailedPrecondition, match="prefill it before decoding"):
        first.decode([0], torch.tensor([[3]]))
    with pytest.raises(OutOfRange, match="exceeds the KV capacity"):
        first.prefill([0], *left_pad([[3] * 7]))
    first.prefill([0], ids, lengths)
    with pytest.raises(FailedPrecondition, match="release it first"):
        first.prefill([0], ids, lengths)
    for _ in range(3):
        first.decode([0], torch.tensor([[3]]))
    with pytest.raises(OutOfRange, match="slot 0 is full"):
        first.decode([0], torch.tensor([[3]]))
    assert first.release([0, 1]) == 1
    first.prefill([0], ids, lengths)  # the slot is usable again


def test_unsupported_range_and_family(tmp_path):
    build_checkpoint("opt", tmp_path)
    with pytest.raises(InvalidArgument, match="within the model's 4 layers"):
        ModelShard.load(tmp_path, 3, 5, max_slots=1, max_len=4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start, end", [(0, 4), (0, 2), (1, 3), (2, 4)])
def test_weight_bytes_predicted_from_config_equal_loaded(tmp_path, family, start, end):
    build_checkpoint(family, tmp_path)
    shard = ModelShard.load(tmp_path, start, end, max_slots=1, max_len=4)
    assert ModelShard.predict_weight_bytes(shard.config, start, end, torch.float32) == shard.weight_bytes()
