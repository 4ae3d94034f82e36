"""What the coordinator knows about the model without loading it: layer count, vocabulary size and
end-of-sequence ids (from config.json / generation_config.json), and the tokenizer for text prompts.

transformers is imported only when a tokenizer is actually loaded, so a coordinator fed token ids
starts quickly.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import structlog

from pqmesh.errors import FailedPrecondition

log = structlog.get_logger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelFacts:
    num_layers: int | None = None
    vocab_size: int | None = None
    eos_ids: frozenset[int] = frozenset()


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def read_model_facts(directory: Path | None) -> ModelFacts:
    """Facts from a checkpoint directory; empty when it is None or has no config.json."""
    if directory is None or not (Path(directory) / "config.json").is_file():
        return ModelFacts()
    config = json.loads((Path(directory) / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    eos = _ids(config.get("eos_token_id"))
    generation = Path(directory) / "generation_config.json"
    if generation.is_file():
        eos |= _ids(json.loads(generation.read_text()).get("eos_token_id"))
    return ModelFacts(layers, config.get("vocab_size"), frozenset(eos))


def has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES)


class TextCodec:
    """Text to token ids and back with a Hugging Face tokenizer directory."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise FailedPrecondition(f"cannot load a tokenizer from {directory}: {err}; pass --tokenizer DIR "
                                     "pointing at a directory with tokenizer.json") from None
        self.directory = Path(directory)
        self._lock = threading.Lock()  # one Rust tokenizer shared by gRPC handlers and the engine thread
        log.info("tokenizer_loaded", directory=str(directory), vocab=len(self._tokenizer))

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self._tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset({int(eos)})

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self._tokenizer(text)["input_ids"])

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, as `encode` gives them, in one batch call."""
        with self._lock:
            return [list(ids) for ids in self._tokenizer(list(texts))["input_ids"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the checkpoint's chat template and the generation prompt."""
        conversation = [{"role": role, "content": content} for role, content in messages]
        with self._lock:
            ids = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def end_of_turn_ids(self) -> frozenset[int]:
        """The special tokens the chat template writes right after an assistant turn (e.g. <|im_end|>),
        plus the tokenizer's EOS: chat generation stops at any of them. Empty without a template."""
        if not self.has_chat_template:
            return frozenset()
        marker = "\u2063pqmesh-end-of-turn\u2063"
        with self._lock:
            text = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
            after = text[text.rindex(marker) + len(marker):] if marker in text else ""
            ids = self._tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
            special = set(self._tokenizer.all_special_ids)
            added = {int(i) for i in getattr(self._tokenizer, "added_tokens_decoder", {})}
        first = [t for t in ids[:2] if t in special or t in added]
        return frozenset(first[:1]) | self.eos_ids
