"""Calibration text -> token windows, and a runner that pushes them through a checkpoint one decoder
layer at a time.

`LayerwiseRunner` holds the hidden states of every window (windows x tokens x hidden) and one decoder
layer at a time, read straight from the safetensors checkpoint, so the model is never materialized.
Each layer runs through the family adapter with a one-layer KV cache, exactly as `ModelShard` runs it,
and anything can be done between loading a layer and advancing the hidden states past it (hooks on
its linears, running quantized copies of it on the same inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import structlog
import torch
from torch import nn

from pqmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from pqmesh.model.families import family_for
from pqmesh.model.kv_cache import AttentionStep, StaticKVCache
from pqmesh.model.loading import CheckpointReader, fill_module, load_config

log = structlog.get_logger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokens(model_dir: str | Path, text_path: str | Path, max_tokens: int | None = None) -> list[int]:
    """Token ids of a text file with the checkpoint's tokenizer (no special tokens added).

    Checkpoints that ship no tokenizer (the tiny test models) get UTF-8 bytes as ids, which needs a
    vocabulary of at least 256.
    """
    text_path, model_dir = Path(text_path), Path(model_dir)
    if not text_path.is_file():
        raise NotFound(f"text file {text_path} does not exist")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        vocab = load_config(model_dir).vocab_size
        if vocab < 256:
            raise FailedPrecondition(
                f"{model_dir} has no tokenizer and a vocabulary of {vocab} < 256 for byte ids; add tokenizer files"
            )
        log.warning("byte_tokens", model_dir=str(model_dir), reason="checkpoint ships no tokenizer")
        ids = list(text.encode("utf-8"))
    return ids[:max_tokens] if max_tokens else ids


def bos_token(model_dir: str | Path) -> int | None:
    """The BOS id when the checkpoint's tokenizer starts every text with one by default (Gemma: its
    perplexity on WikiText-2 windows without it is about twice as high), else None (SmolLM2, and
    checkpoints without a tokenizer)."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def token_windows(
    tokens: list[int], seq_len: int, count: int | None = None, bos: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` from the start of ``tokens`` (at most ``count``).

    With ``bos``, each window is that id followed by the next ``seq_len - 1`` tokens of the text (so
    every window predicts ``seq_len - 1`` real tokens either way). A text shorter than one window
    gives one window of all its tokens.
    """
    if seq_len < 2:
        raise InvalidArgument(f"window length must be at least 2 tokens, got {seq_len}")
    if len(tokens) < 2:
        raise InvalidArgument(f"the text holds {len(tokens)} tokens; at least 2 are needed")
    step = seq_len - (bos is not None)
    if len(tokens) < step:
        return torch.tensor([([bos] if bos is not None else []) + tokens], dtype=torch.long)
    n = len(tokens) // step
    if count is not None:
        n = min(n, count)
    windows = torch.tensor(tokens[: n * step], dtype=torch.long).view(n, step)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


class LayerwiseRunner:
    """Hidden states of ``windows`` after each decoder layer in turn; see module docstring."""

    def __init__(
        self,
        model_dir: str | Path,
        windows: torch.Tensor,
        micro_batch: int = 4,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if windows.dim() != 2 or windows.numel() == 0:
            raise InvalidArgument(f"windows must be a non-empty [n, tokens] tensor, got shape {tuple(windows.shape)}")
        if micro_batch < 1:
            raise InvalidArgument(f"micro-batch must be at least 1, got {micro_batch}")
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        self.family = family_for(self.config)
        self.num_layers = self.config.num_hidden_layers
        self.dtype, self.device = dtype, torch.device(device)
        self.micro_batch = micro_batch
        self.reader = CheckpointReader(self.model_dir)
        self.width = windows.shape[1]
        self.windows = windows  # the token ids, for measures that run the whole model (`sensitivity`)
        kv_heads, head_dim = self.family.kv_shape()
        self._cache = StaticKVCache(1, micro_batch, self.width, kv_heads, head_dim, dtype, self.device)
        self._runtime = self.family.runtime_modules(self.device)
        self._steps: dict[int, tuple[AttentionStep, dict]] = {}
        self.hidden = self._embed(windows.to(self.device))

    def close(self) -> None:
        self.reader.close()

    def batches(self) -> Iterator[slice]:
        for first in range(0, self.hidden.shape[0], self.micro_batch):
            yield slice(first, min(first + self.micro_batch, self.hidden.shape[0]))

    def _step(self, batch: int) -> tuple[AttentionStep, dict]:
        """A prefill step over full windows (no padding); never committed, so reusable."""
        if batch not in self._steps:
            step = AttentionStep.for_prefill(
                self._cache, list(range(batch)), [self.width] * batch, self.width, self.device
            )
            self._steps[batch] = (step, self.family.step_extras(self._runtime, step, self.dtype))
        return self._steps[batch]

    @torch.inference_mode()
    def _embed(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.device("meta"):
            parts = self.family.build_embed()
        for module, prefix in parts.values():
            fill_module(module, prefix, self.reader, self.dtype, self.device)
        embed = nn.ModuleDict({name: module for name, (module, _) in parts.items()})
        outs = []
        for first in range(0, windows.shape[0], self.micro_batch):
            ids = windows[first:first + self.micro_batch]
            outs.append(self.family.embed(embed, ids, self._step(ids.shape[0])[0]))
        return torch.cat(outs)

    def load_layer(self, index: int) -> nn.Module:
        """A fresh 16-bit copy of decoder layer ``index`` read from the checkpoint."""
        with torch.device("meta"):
            layer = self.family.build_layer(index)
        return fill_module(layer, f"{self.family.layer_prefix}{index}", self.reader, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``layer`` applied to hidden states ``[b, tokens, hidden]`` (b <= micro_batch)."""
        step, extras = self._step(inputs.shape[0])
        return self.family.layer(layer, 0, inputs, step, extras)

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """Replaces the hidden states by a layer's outputs, given per micro-batch in `batches` order."""
        self.hidden = torch.cat(outputs)


def calibration_windows(model_dir: str | Path, calib_path: str | Path, samples: int, seq_len: int) -> torch.Tensor:
    """Exactly ``samples`` windows of ``seq_len`` tokens from the start of a calibration text, or an
    InvalidArgument saying how many tokens the file holds and what to change."""
    if samples < 1:
        raise InvalidArgument(f"give at least one calibration window, got {samples}")
    bos = bos_token(model_dir)
    step = seq_len - (bos is not None)
    need = samples * step
    tokens = load_tokens(model_dir, calib_path, max_tokens=need)
    if len(tokens) < need:
        raise InvalidArgument(
            f"calibration file {calib_path} holds {len(tokens)} tokens; {samples} windows of {step} need {need}: "
            f"give a longer file, or fewer windows (--samples {max(1, len(tokens) // step)}) or shorter ones"
        )
    return token_windows(tokens, seq_len, samples, bos)
