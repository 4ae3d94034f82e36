"""coordinator.resolve: a window of stored prompts resolved at once (texts tokenized in one batch) gives
exactly what the tokenizer gives each text, and every other row (chat, token ids, bad lines) resolves
as it does alone. Real SmolLM2 tokenizer and chat template, no gRPC."""

from __future__ import annotations

import pytest
from batch_helpers import build_chat_checkpoint, chat_line, completion_line
from transformers import AutoTokenizer

from coordinator.resolve import Resolved, Resolver
from coordinator.settings import GenerationSettings
from coordinator.store import PendingPrompt, ResultRecord
from coordinator.text import TextCodec
from pqmesh.api.coordinator.v1 import coordinator_pb2

TEXTS = ["The sky is", "  leading spaces and a tab\t", "Ünïcödé — and 数字 123", "x" * 300, "a\nb"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny-chat"
    build_chat_checkpoint(directory, layers=1)
    return directory


def rows() -> list[PendingPrompt]:
    found = [PendingPrompt(i, None, coordinator_pb2.Prompt(text=t).SerializeToString()) for i, t in enumerate(TEXTS)]
    lines = [completion_line("c", "Once upon a time", max_tokens=4), chat_line("m", "Name a colour."),
             completion_line("empty", ""), "{not json", completion_line("long", "word " * 200)]
    found += [PendingPrompt(len(found) + i, None, coordinator_pb2.Prompt(jsonl_line=line).SerializeToString())
              for i, line in enumerate(lines)]
    return [*found, PendingPrompt(len(found), [5, 6, 7], None), PendingPrompt(len(found) + 1, [10**9], None)]


def test_a_window_resolves_as_each_row_alone_and_texts_as_the_tokenizer_gives_them(model_dir, monkeypatch):
    codec = TextCodec(model_dir)
    resolver = Resolver(96, codec, vocab_size=49152, eos_ids=frozenset({2}))
    settings = GenerationSettings(8)
    alone = [resolver.stored(row, settings) for row in rows()]

    def no_single_calls(text):
        raise AssertionError(f"encode({text!r}) called: the window's texts must go in one batch")

    monkeypatch.setattr(codec, "encode", no_single_calls)
    window = resolver.stored_many(rows(), settings)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text, resolved in zip(TEXTS, window):
        assert isinstance(resolved, Resolved) and list(resolved.prompt) == tokenizer(text)["input_ids"]
    kinds = [type(r).__name__ for r in window]
    assert kinds == ["Resolved"] * 7 + ["ResultRecord"] * 3 + ["Resolved", "ResultRecord"], kinds
    for one, many in zip(alone, window):
        if isinstance(one, Resolved):
            assert (one.prompt, one.max_new_tokens, one.stop_ids, one.sampling) == \
                   (many.prompt, many.max_new_tokens, many.stop_ids, many.sampling)
        else:
            assert isinstance(many, ResultRecord)
            assert (one.index, one.error_code, one.error, one.custom_id) == \
                   (many.index, many.error_code, many.error, many.custom_id)
    codes = {r.custom_id: r.error_code for r in window if isinstance(r, ResultRecord)}
    assert codes["empty"] == "invalid_request" and codes["long"] == "context_length_exceeded"
    assert window[-1].error_code == "invalid_request" and "outside the vocabulary" in window[-1].error
