"""Small random checkpoints wide enough (hidden 256) for group size 128 to mean something."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, OPTConfig, PretrainedConfig

WIDE_FAMILIES = ("llama", "opt", "bloom")


def wide_config(family: str, layers: int = 2, hidden: int = 256) -> PretrainedConfig:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden + 64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            initializer_range=0.05, **common,
        )
    if family == "opt":
        return OPTConfig(
            hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=hidden, init_std=0.05, dropout=0.0,
            attention_dropout=0.0, **common,
        )
    if family == "bloom":
        return BloomConfig(
            hidden_size=hidden, n_layer=layers, n_head=4, initializer_range=0.05, hidden_dropout=0.0,
            attention_dropout=0.0, **common,
        )
    raise ValueError(family)


def build_wide_checkpoint(family: str, directory: Path, layers: int = 2, hidden: int = 256, seed: int = 0):
    """Saves a random model as safetensors in ``directory``; returns its config."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(wide_config(family, layers, hidden), dtype=torch.float32).eval()
    model.save_pretrained(directory)
    return model.config
