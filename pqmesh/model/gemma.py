"""The Gemma 3 (text) family adapter: what differs from Llama.

- embeddings scaled by ``sqrt(hidden_size)`` (rounded to the weight dtype, as transformers does);
- RMSNorm with ``(1 + weight)``, computed in float32 (transformers' own ``Gemma3RMSNorm`` modules);
- RMSNorm of every query and key head (``q_norm``, ``k_norm``) before RoPE;
- four norms per layer: input, post-attention (on the attention output, before the residual add),
  pre- and post-feed-forward (around the MLP, again before the residual add);
- GeGLU MLP (``gelu_pytorch_tanh``; transformers' ``Gemma3MLP``);
- attention scale ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``;
- per-layer attention type (``config.layer_types``): ``sliding_attention`` layers use the local RoPE
  base and see only the last ``sliding_window`` positions (`AttentionStep.window_mask`),
  ``full_attention`` layers the global base and the whole context. The KV cache keeps every
  position for both kinds, so memory is predicted as for full attention.

Logit soft-capping (Gemma 2; ``None`` in Gemma 3 configs) and bidirectional attention are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pqmesh.errors import UnsupportedModel
from pqmesh.model.family import Family, split_heads


class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3_text",)
    layer_prefix = "model.layers."

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        from transformers.models.gemma3 import modeling_gemma3

        self._modeling = modeling_gemma3
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, key, None) is not None:
                raise UnsupportedModel(f"gemma3 config sets {key}={getattr(config, key)}; pqmesh runs no soft-capping")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModel("gemma3 config uses bidirectional attention; pqmesh runs causal decoders only")

    def kv_shape(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.config.head_dim

    def build_layer(self, index: int) -> nn.Module:
        return self._modeling.Gemma3DecoderLayer(self.config, layer_idx=index)

    def embed_key(self) -> str:
        return "model.embed_tokens.weight"

    def build_embed(self):
        c = self.config
        return {"embed_tokens": (nn.Embedding(c.vocab_size, c.hidden_size), "model.embed_tokens")}

    def build_final(self):
        c = self.config
        return {"norm": (self._modeling.Gemma3RMSNorm(c.hidden_size, eps=c.rms_norm_eps), "model.norm")}

    def runtime_modules(self, device):
        return {"rotary": self._modeling.Gemma3RotaryEmbedding(self.config, device=device).to(device)}

    def embed(self, parts, input_ids, step):
        table = parts["embed_tokens"]
        scale = torch.tensor(self.config.hidden_size**0.5).to(table.weight.dtype)
        return table(input_ids) * scale.to(table.weight.device)

    def step_extras(self, runtime, step, dtype):
        probe = torch.empty((), dtype=dtype, device=step.positions.device)
        rope = {kind: runtime["rotary"](probe, step.positions, kind) for kind in set(self.config.layer_types)}
        return {"rope": rope}

    def layer(self, module, cache_index, hidden, step, extras):
        attn, dim = module.self_attn, self.config.head_dim
        residual = hidden
        x = module.input_layernorm(hidden)
        q = attn.q_norm(split_heads(attn.q_proj(x), dim))
        k = attn.k_norm(split_heads(attn.k_proj(x), dim))
        v = split_heads(attn.v_proj(x), dim)
        cos, sin = extras["rope"][attn.layer_type]
        q, k = self._modeling.apply_rotary_pos_emb(q, k, cos, sin)
        out = step.attend(cache_index, q, k, v, scale=attn.scaling, window=attn.sliding_window)
        hidden = residual + module.post_attention_layernorm(attn.o_proj(out))
        x = module.pre_feedforward_layernorm(hidden)
        return hidden + module.post_feedforward_layernorm(module.mlp(x))

    def final(self, parts, hidden):
        return parts["norm"](hidden)
