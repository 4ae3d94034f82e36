"""The real embedded checkpoint (SmolLM2-135M) in two slices equals Hugging Face generate."""

from __future__ import annotations

import pytest
import torch
from tiny_models import reference_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from pqmesh.model import LocalPipeline, ModelShard
from pqmesh.model.embedded import prepare
from pqmesh.stage_wire import left_pad

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    directory = prepare()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(directory)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    return directory, model, [tokenizer(t)["input_ids"] for t in texts]


def test_two_slices_match_hf_generate(smollm2):
    directory, model, prompts = smollm2
    config = model.config
    cut = config.num_hidden_layers // 2
    shards = [
        ModelShard.load(directory, a, b, max_slots=4, max_len=48)
        for a, b in [(0, cut), (cut, config.num_hidden_layers)]
    ]
    pipeline = LocalPipeline(shards)
    assert pipeline.generate_greedy(prompts, 16, prefill_micro_batch=2, decode_micro_batch=3) == reference_greedy(
        model, prompts, 16
    )

    ids, lengths = left_pad(prompts)
    logits = pipeline.prefill([0, 1, 2], ids, lengths, all_logits=True)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0]
        got = logits[row, ids.shape[1] - len(prompt):]
        assert (got - ref).abs().max() / ref.abs().max() < 1e-5
