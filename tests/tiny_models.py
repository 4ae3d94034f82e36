"""Tiny random OPT, BLOOM, Llama, Mistral, Qwen2 and Gemma 3 checkpoints built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 256
#: Torch device of the mesh tests and their references; set from pytest's --device (tests/conftest.py).
DEVICE = "cpu"


def tiny_config(family: str, layers: int = 4) -> PretrainedConfig:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
            initializer_range=0.1, **common,
        )
    if family == "mistral":  # no sliding window: the only mistral form the model core supports
        return MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, sliding_window=None,
            initializer_range=0.1, **common,
        )
    if family == "qwen2":  # q/k/v projections with biases, tied embeddings
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, use_sliding_window=False,
            initializer_range=0.1, **common,
        )
    if family == "gemma3":  # q/k norms, 4 norms per layer, GeGLU, sliding (window 5) and full layers, 2 RoPE bases
        return Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=128,
            sliding_window=5, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            tie_word_embeddings=True, initializer_range=0.1, **common,
        )
    if family == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.1, dropout=0.0,
            attention_dropout=0.0, **common,
        )
    if family == "opt-350m-style":  # post-LayerNorm, projections in and out of a narrower embedding
        return OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False,
            init_std=0.1, dropout=0.0, attention_dropout=0.0, **common,
        )
    if family == "bloom":
        return BloomConfig(
            hidden_size=64, n_layer=layers, n_head=4, initializer_range=0.1, hidden_dropout=0.0,
            attention_dropout=0.0, **common,
        )
    raise ValueError(family)


def build_checkpoint(family: str, directory: Path, layers: int = 4, seed: int = 0, max_shard_size: str | None = None):
    """Saves a random model as safetensors in ``directory``; returns the model (eval, fp32)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.float32).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    model.generation_config.eos_token_id = None  # references run full length, like our driver
    model.generation_config.pad_token_id = 0
    return model


def reference_greedy(model, prompts, max_new_tokens: int) -> list[list[int]]:
    """Hugging Face generate on `DEVICE`, one prompt at a time (no padding involved)."""
    out = []
    model.to(DEVICE)
    for prompt in prompts:
        ids = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        out.append(gen[0, len(prompt):].tolist())
    return out
