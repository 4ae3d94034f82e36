"""Model shapes: the few numbers of a decoder-only model that the cost model needs.

`ModelShape` is built from a Hugging Face `config.json` (OPT, BLOOM, Llama-style incl. GQA, Gemma 3
text) without importing transformers, or from the built-in public configs in `planner.catalog`. It knows the
decoder layer's linear matrices (quantized), its 16-bit parameters (norms, biases), and the
embedding and LM-head parameters that stay 16-bit on the first and last stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from planner.hashing import cached_hash, state_without_hash
from pqmesh.errors import InvalidArgument, UnsupportedModel

SHAPE_VERSION = 1
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GEMMA3_TYPES = ("gemma3_text",)
FAMILIES = ("opt", "bloom", "llama", "gemma3")
# fields added after SHAPE_VERSION 1 was first written: left out of the fingerprint while at their
# default, so profiles measured before they existed still match their models
_LATER_FIELDS = {"layer_norms": 2, "qk_norm": False, "out_proj_bias": True}

MAX_LAYERS = 1024  # decoder layers; the largest public models have under 200


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of one decoder-only model. All decoder layers share one shape."""

    name: str
    family: str  # "opt", "bloom", "llama" or "gemma3"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int = 2048
    tied_embeddings: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    gated_mlp: bool = False
    rms_norm: bool = False
    embed_dim: int = 0  # OPT word_embed_proj_dim; 0 means hidden_size
    learned_positions: bool = False
    embed_layernorm: bool = False
    final_norm: bool = True  # False for post-LayerNorm OPT (opt-350m), which has no final norm
    layer_norms: int = 2  # hidden-size norms per decoder layer (Gemma 3: 4, around attention and MLP)
    qk_norm: bool = False  # a head_dim RMSNorm on queries and one on keys (Gemma 3)
    out_proj_bias: bool = True  # with attention_bias: the output projection's too (Qwen2 has none)
    version: int = SHAPE_VERSION

    __hash__ = cached_hash
    __getstate__ = state_without_hash

    @property
    def fingerprint(self) -> str:
        """A hash of every dimension but the name: two models with one fingerprint time alike."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        for key, default in _LATER_FIELDS.items():
            if data[key] == default:
                del data[key]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        if self.version != SHAPE_VERSION:
            raise InvalidArgument(f"model shape version {self.version} is not supported; use {SHAPE_VERSION}")
        if self.family not in FAMILIES:
            raise UnsupportedModel(f"model family {self.family!r} is not supported; use {', '.join(FAMILIES)}")
        for field in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            if getattr(self, field) <= 0:
                raise InvalidArgument(f"model {self.name!r}: {field} must be positive, got {getattr(self, field)}")
        if self.num_layers > MAX_LAYERS:
            raise InvalidArgument(
                f"model {self.name!r}: {self.num_layers} layers; the planner takes at most {MAX_LAYERS}"
            )
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgument(
                f"model {self.name!r}: {self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads"
            )

    # -- per decoder layer ----------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one of K or V per token: kv heads x head dim (smaller than hidden under GQA)."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> tuple[tuple[int, int], ...]:
        """(in_features, out_features) of each quantizable matrix of one decoder layer."""
        h, f = self.hidden_size, self.intermediate_size
        attention = ((h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h))
        mlp = ((h, f), (h, f), (f, h)) if self.gated_mlp else ((h, f), (f, h))
        return attention + mlp

    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes())

    def layer_fp16_params(self) -> int:
        """Parameters of one decoder layer that stay 16-bit: norms and biases."""
        h = self.hidden_size
        norms = self.layer_norms * (h if self.rms_norm else 2 * h) + (2 * self.head_dim if self.qk_norm else 0)
        bias = 0
        if self.attention_bias:
            bias += self.q_dim + 2 * self.kv_dim + (h if self.out_proj_bias else 0)
        if self.mlp_bias:
            bias += (2 if self.gated_mlp else 1) * self.intermediate_size + h
        return norms + bias

    # -- first and last stage -------------------------------------------------------------------
    @property
    def token_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    def embedding_params(self) -> int:
        """Parameters only the first stage holds: token (and position) embeddings, projections."""
        h = self.hidden_size
        params = self.vocab_size * self.token_dim
        if self.learned_positions:
            params += (self.max_positions + 2) * h  # OPT offsets positions by 2
        if self.token_dim != h:
            params += self.token_dim * h
        if self.embed_layernorm:
            params += 2 * h
        return params

    def head_params(self) -> int:
        """Parameters only the last stage holds: final norm, projection and the LM head matrix."""
        h = self.hidden_size
        params = self.vocab_size * self.token_dim
        if self.final_norm:
            params += h if self.rms_norm else 2 * h
        if self.token_dim != h:
            params += h * self.token_dim
        return params

    def total_params(self) -> int:
        layers = self.num_layers * (self.linear_params() + self.layer_fp16_params())
        head = self.head_params() - (self.vocab_size * self.token_dim if self.tied_embeddings else 0)
        return layers + self.embedding_params() + head

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelShape:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"unknown model shape fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def _get(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise InvalidArgument(f"config.json lacks {' or '.join(keys)}; add it")
    return default


def from_hf_config(config: dict, name: str = "") -> ModelShape:
    """A `ModelShape` from the dict of a Hugging Face `config.json` (OPT, BLOOM or Llama-style)."""
    kind = config.get("model_type", "")
    known = ("opt", "bloom", *LLAMA_TYPES, *GEMMA3_TYPES)
    if kind not in known:
        raise UnsupportedModel(
            f"config.json model_type {kind!r} is not supported; the planner knows {', '.join(known)}"
        )
    name = name or config.get("_name_or_path") or kind
    layers = _get(config, "num_hidden_layers", "n_layer")
    heads = _get(config, "num_attention_heads", "n_head")
    hidden = _get(config, "hidden_size", "n_embed")
    common = dict(
        name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, vocab_size=_get(config, "vocab_size")
    )
    if kind == "opt":
        return ModelShape(
            family="opt",
            intermediate_size=_get(config, "ffn_dim"),
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_positions=_get(config, "max_position_embeddings", default=2048),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            attention_bias=bool(config.get("enable_bias", True)),
            mlp_bias=bool(config.get("enable_bias", True)),
            embed_dim=_get(config, "word_embed_proj_dim", default=hidden),
            learned_positions=True,
            final_norm=bool(config.get("do_layer_norm_before", True))
            and not config.get("_remove_final_layer_norm", False),
            **common,
        )
    if kind == "bloom":
        return ModelShape(
            family="bloom",
            intermediate_size=4 * hidden,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_positions=_get(config, "seq_length", default=2048),
            tied_embeddings=True,
            embed_layernorm=True,
            **common,
        )
    if kind in GEMMA3_TYPES:
        return _gemma3(config, common)
    kv_heads = _get(config, "num_key_value_heads", default=heads)  # Llama-style
    return ModelShape(
        family="llama",
        intermediate_size=_get(config, "intermediate_size"),
        num_kv_heads=kv_heads,
        head_dim=_get(config, "head_dim", default=hidden // heads),
        max_positions=_get(config, "max_position_embeddings", default=4096),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", kind == "qwen2")),
        out_proj_bias=kind != "qwen2",  # Qwen2 biases q, k and v only
        mlp_bias=bool(config.get("mlp_bias", False)),
        gated_mlp=True,
        rms_norm=True,
        **common,
    )


def _gemma3(config: dict, common: dict) -> ModelShape:
    """Gemma 3 text: Llama-like with GeGLU, four norms per layer and q/k norms, tied embeddings.

    Its sliding-window layers keep every position in pqmesh's KV cache (`pqmesh.model.gemma`), so
    the KV bytes are those of full attention for every layer, as the stage server allocates them."""
    return ModelShape(
        family="gemma3",
        intermediate_size=_get(config, "intermediate_size"),
        num_kv_heads=_get(config, "num_key_value_heads", default=common["num_heads"]),
        head_dim=_get(config, "head_dim", default=256),
        max_positions=_get(config, "max_position_embeddings", default=32768),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=False,
        gated_mlp=True,
        rms_norm=True,
        layer_norms=4,
        qk_norm=True,
        **common,
    )
