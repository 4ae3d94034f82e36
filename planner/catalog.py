"""Built-in model shapes, written as the public Hugging Face `config.json` values they come from.

`resolve_model` turns what a user typed (a built-in name such as "opt-30b" or "meta-llama/Llama-2-70b-hf",
a path to a `config.json` or a checkpoint directory, or inline config JSON) into a `ModelShape`.
"""

from __future__ import annotations

import json
from pathlib import Path

from planner.model_shapes import ModelShape, from_hf_config
from pqmesh.errors import InvalidArgument, NotFound


def _opt(hidden: int, layers: int, heads: int) -> dict:
    return {"model_type": "opt", "hidden_size": hidden, "ffn_dim": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "vocab_size": 50272, "max_position_embeddings": 2048,
            "word_embed_proj_dim": hidden, "enable_bias": True, "do_layer_norm_before": True}


def _bloom(hidden: int, layers: int, heads: int) -> dict:
    return {"model_type": "bloom", "hidden_size": hidden, "n_layer": layers, "n_head": heads, "vocab_size": 250880}


def _llama(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, positions: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": positions, "tie_word_embeddings": False}


#: name -> the config.json fields the planner reads (values from the models' public configs).
BUILTIN_CONFIGS: dict[str, dict] = {
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    "bloom-3b": _bloom(2560, 30, 32),
    "bloom-176b": _bloom(14336, 70, 112),
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256, 8192),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256, 8192),
    # the embedded model (`pqmesh model prepare`); its shipped indicator: planner/indicators/
    "smollm2-135m-instruct": {**_llama(576, 1536, 30, 9, 3, 49152, 8192), "head_dim": 64, "tie_word_embeddings": True},
    # the second embedded model (`pqmesh model prepare --model gemma-3-270m`)
    "gemma-3-270m": {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
                     "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                     "vocab_size": 262144, "max_position_embeddings": 32768, "tie_word_embeddings": True},
}
_ALIASES = {"bloom": "bloom-176b", "meta-llama-3-8b": "llama-3-8b", "meta-llama-3-70b": "llama-3-70b"}


def canonical_name(name: str) -> str:
    """"facebook/OPT-30B" -> "opt-30b"; "meta-llama/Llama-2-70b-hf" -> "llama-2-70b"."""
    key = name.strip().lower().rsplit("/", 1)[-1].removesuffix("-hf").replace("_", "-")
    return _ALIASES.get(key, key)


def builtin_model(name: str) -> ModelShape:
    key = canonical_name(name)
    if key not in BUILTIN_CONFIGS:
        raise NotFound(f"unknown model {name!r}; use a config.json path or one of {sorted(BUILTIN_CONFIGS)}")
    return from_hf_config(BUILTIN_CONFIGS[key], name=key)


def model_from_config_json(text: str, name: str = "") -> ModelShape:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"model config is not valid JSON ({err}); pass a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise InvalidArgument("model config JSON must be an object, as in a Hugging Face config.json")
    return from_hf_config(config, name=name)


def resolve_model(name_or_path: str) -> ModelShape:
    """A built-in name, a `config.json` path, a checkpoint directory holding one, or inline JSON."""
    text = name_or_path.strip()
    if text.startswith("{"):
        return model_from_config_json(text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise NotFound(f"model config {path} does not exist; pass a config.json or a built-in name")
        return model_from_config_json(
            path.read_text(), name=path.parent.name if path.name == "config.json" else path.stem
        )
    return builtin_model(text)
