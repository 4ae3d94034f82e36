"""Family adapters: what differs between OPT, BLOOM and Llama-style models.

Each adapter builds Hugging Face's own modules (so parameter names and shapes match checkpoints
exactly, and quantization can swap their ``nn.Linear`` children), names the checkpoint tensors each
part needs, and runs the forward math of embeddings, one decoder layer and the final norm against
our slot-addressed KV cache (`AttentionStep`). The math mirrors transformers' modeling code.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import PretrainedConfig

from pqmesh.errors import UnsupportedModel
from pqmesh.model.family import Family, split_heads
from pqmesh.model.gemma import Gemma3Family


class LlamaFamily(Family):
    """Llama and the configs whose transformers classes share its layout (Mistral, Qwen2)."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    layer_prefix = "model.layers."
    _class_prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        kind = config.model_type
        self._modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        self._prefix = self._class_prefix[kind]
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", window is not None) and window:
            raise UnsupportedModel(
                f"{kind} config uses sliding-window attention (window {window}); pqmesh runs full attention only"
            )

    def _cls(self, suffix: str):
        return getattr(self._modeling, f"{self._prefix}{suffix}")

    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def kv_shape(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.head_dim()

    def build_layer(self, index: int) -> nn.Module:
        return self._cls("DecoderLayer")(self.config, layer_idx=index)

    def embed_key(self) -> str:
        return "model.embed_tokens.weight"

    def build_embed(self):
        c = self.config
        return {"embed_tokens": (nn.Embedding(c.vocab_size, c.hidden_size), "model.embed_tokens")}

    def build_final(self):
        c = self.config
        return {"norm": (self._cls("RMSNorm")(c.hidden_size, eps=c.rms_norm_eps), "model.norm")}

    def runtime_modules(self, device):
        return {"rotary": self._cls("RotaryEmbedding")(self.config).to(device)}

    def embed(self, parts, input_ids, step):
        return parts["embed_tokens"](input_ids)

    def step_extras(self, runtime, step, dtype):
        probe = torch.empty((), dtype=dtype, device=step.positions.device)
        cos, sin = runtime["rotary"](probe, step.positions)
        return {"cos": cos, "sin": sin}

    def layer(self, module, cache_index, hidden, step, extras):
        attn, dim = module.self_attn, self.head_dim()
        residual = hidden
        x = module.input_layernorm(hidden)
        q = split_heads(attn.q_proj(x), dim)
        k = split_heads(attn.k_proj(x), dim)
        v = split_heads(attn.v_proj(x), dim)
        q, k = self._modeling.apply_rotary_pos_emb(q, k, extras["cos"], extras["sin"])
        out = step.attend(cache_index, q, k, v, scale=attn.scaling)
        hidden = residual + attn.o_proj(out)
        return hidden + module.mlp(module.post_attention_layernorm(hidden))

    def final(self, parts, hidden):
        return parts["norm"](hidden)


class OptFamily(Family):
    """OPT: learned positions (offset 2), pre- or post-LayerNorm, optional in/out projections."""

    name = "opt"
    model_types = ("opt",)
    layer_prefix = "model.decoder.layers."

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        from transformers.models.opt import modeling_opt

        self._modeling = modeling_opt

    def build_layer(self, index):
        return self._modeling.OPTDecoderLayer(self.config, layer_idx=index)

    def embed_key(self):
        return "model.decoder.embed_tokens.weight"

    def head_width(self):
        return self.config.word_embed_proj_dim

    def _projects(self) -> bool:
        return self.config.word_embed_proj_dim != self.config.hidden_size

    def build_embed(self):
        c = self.config
        parts = {
            "embed_tokens": (nn.Embedding(c.vocab_size, c.word_embed_proj_dim), "model.decoder.embed_tokens"),
            "embed_positions": (
                self._modeling.OPTLearnedPositionalEmbedding(c.max_position_embeddings, c.hidden_size),
                "model.decoder.embed_positions",
            ),
        }
        if self._projects():
            parts["project_in"] = (
                nn.Linear(c.word_embed_proj_dim, c.hidden_size, bias=False),
                "model.decoder.project_in",
            )
        return parts

    def build_final(self):
        c = self.config
        parts = {}
        if c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False):
            norm = nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine)
            parts["final_layer_norm"] = (norm, "model.decoder.final_layer_norm")
        if self._projects():
            parts["project_out"] = (
                nn.Linear(c.hidden_size, c.word_embed_proj_dim, bias=False),
                "model.decoder.project_out",
            )
        return parts

    def embed(self, parts, input_ids, step):
        x = parts["embed_tokens"](input_ids)
        if "project_in" in parts:
            x = parts["project_in"](x)
        positions = parts["embed_positions"]
        return x + nn.functional.embedding(step.positions + positions.offset, positions.weight)

    def layer(self, module, cache_index, hidden, step, extras):
        attn, before = module.self_attn, module.do_layer_norm_before
        residual = hidden
        x = module.self_attn_layer_norm(hidden) if before else hidden
        q = split_heads(attn.q_proj(x) * attn.scaling, attn.head_dim)
        k = split_heads(attn.k_proj(x), attn.head_dim)
        v = split_heads(attn.v_proj(x), attn.head_dim)
        hidden = residual + attn.out_proj(step.attend(cache_index, q, k, v, scale=1.0))
        if not before:
            hidden = module.self_attn_layer_norm(hidden)
        residual = hidden
        x = module.final_layer_norm(hidden) if before else hidden
        hidden = residual + module.fc2(module.activation_fn(module.fc1(x)))
        return hidden if before else module.final_layer_norm(hidden)

    def final(self, parts, hidden):
        if "final_layer_norm" in parts:
            hidden = parts["final_layer_norm"](hidden)
        if "project_out" in parts:
            hidden = parts["project_out"](hidden)
        return hidden


class BloomFamily(Family):
    """BLOOM: fused QKV interleaved per head, ALiBi position bias, LayerNorm after embeddings."""

    name = "bloom"
    model_types = ("bloom",)
    layer_prefix = "transformer.h."

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        from transformers.models.bloom import modeling_bloom

        self._modeling = modeling_bloom
        if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
            raise UnsupportedModel("BLOOM configs with slow_but_exact tensor-parallel emulation are not supported")

    def build_layer(self, index):
        return self._modeling.BloomBlock(self.config, layer_idx=index)

    def embed_key(self):
        return "transformer.word_embeddings.weight"

    def build_embed(self):
        c = self.config
        return {
            "word_embeddings": (nn.Embedding(c.vocab_size, c.hidden_size), "transformer.word_embeddings"),
            "word_embeddings_layernorm": (
                nn.LayerNorm(c.hidden_size, eps=c.layer_norm_epsilon),
                "transformer.word_embeddings_layernorm",
            ),
        }

    def build_final(self):
        c = self.config
        return {"ln_f": (nn.LayerNorm(c.hidden_size, eps=c.layer_norm_epsilon), "transformer.ln_f")}

    def embed(self, parts, input_ids, step):
        return parts["word_embeddings_layernorm"](parts["word_embeddings"](input_ids))

    def step_extras(self, runtime, step, dtype):
        heads = self.config.n_head
        batch, span = step.key_valid.shape
        alibi = self._modeling.build_alibi_tensor(step.key_valid.long(), heads, dtype)
        return {"alibi": alibi.view(batch, heads, 1, span)}

    def layer(self, module, cache_index, hidden, step, extras):
        attn = module.self_attention
        x = module.input_layernorm(hidden)
        residual = x if module.apply_residual_connection_post_layernorm else hidden
        batch, width, _ = x.shape
        fused = attn.query_key_value(x).view(batch, width, attn.num_heads, 3, attn.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        out = step.attend(cache_index, q, k, v, scale=attn.inv_norm_factor, bias=extras["alibi"])
        hidden = residual + attn.dense(out)
        x = module.post_attention_layernorm(hidden)
        residual = x if module.apply_residual_connection_post_layernorm else hidden
        return module.mlp(x, residual)

    def final(self, parts, hidden):
        return parts["ln_f"](hidden)


#: Every adapter: the three above and those kept in their own modules.
FAMILIES: tuple[type[Family], ...] = (LlamaFamily, OptFamily, BloomFamily, Gemma3Family)


def family_for(config: PretrainedConfig) -> Family:
    """The adapter for a config, or UnsupportedModel naming what is supported."""
    for cls in FAMILIES:
        if config.model_type in cls.model_types:
            return cls(config)
    known = sorted(t for cls in FAMILIES for t in cls.model_types)
    raise UnsupportedModel(f"model_type {config.model_type!r} is not supported; supported: {', '.join(known)}")

