"""The interface a model family adapter implements (`Family`), and helpers its math shares.

Each adapter builds Hugging Face's own modules (so parameter names and shapes match checkpoints
exactly, and quantization can swap their ``nn.Linear`` children), names the checkpoint tensors each
part needs, and runs the forward math of embeddings, one decoder layer and the final norm against
our slot-addressed KV cache (`AttentionStep`). The adapters live in `pqmesh.model.families` (OPT,
BLOOM, Llama-style) and `pqmesh.model.gemma`; `pqmesh.model.families.family_for` picks one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pqmesh.model.kv_cache import AttentionStep


class Family:
    """Interface; one subclass per model family."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    layer_prefix: str = ""  # checkpoint prefix of decoder layer i is f"{layer_prefix}{i}."

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config

    # -- structure --------------------------------------------------------------------------------
    def build_layer(self, index: int) -> nn.Module:
        raise NotImplementedError

    def build_embed(self) -> dict[str, tuple[nn.Module, str]]:
        """Modules of the first stage, each with its checkpoint prefix."""
        raise NotImplementedError

    def build_final(self) -> dict[str, tuple[nn.Module, str]]:
        """Modules of the last stage before the LM head (final norm, projections)."""
        raise NotImplementedError

    def head_width(self) -> int:
        return self.config.hidden_size

    def embed_key(self) -> str:
        """Checkpoint name of the token embedding (the LM head's weight when tied)."""
        raise NotImplementedError

    def kv_shape(self) -> tuple[int, int]:
        """(kv heads, head dim) of one layer's cache."""
        c = self.config
        return c.num_attention_heads, c.hidden_size // c.num_attention_heads

    def runtime_modules(self, device) -> dict[str, nn.Module]:
        """Modules with no checkpoint tensors (rotary tables), built on the real device."""
        return {}

    # -- math -------------------------------------------------------------------------------------
    def embed(self, parts: nn.ModuleDict, input_ids: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        raise NotImplementedError

    def step_extras(self, runtime: dict, step: AttentionStep, dtype: torch.dtype) -> dict:
        """Per-step tensors shared by all layers (rotary cos/sin, ALiBi bias)."""
        return {}

    def layer(
        self, module: nn.Module, cache_index: int, hidden: torch.Tensor, step: AttentionStep, extras: dict
    ) -> torch.Tensor:
        raise NotImplementedError

    def final(self, parts: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, width, _ = x.shape
    return x.view(batch, width, -1, head_dim).transpose(1, 2)
