"""Model shapes read from configs count exactly the parameters Hugging Face builds for them."""

from __future__ import annotations

import pytest
from tiny_models import tiny_config

from planner.model_shapes import from_hf_config


def _first_layer(model):
    base = getattr(model, "model", None) or model.transformer
    if hasattr(base, "decoder"):
        return base.decoder.layers[0]
    return base.h[0] if hasattr(base, "h") else base.layers[0]


@pytest.mark.parametrize("family", ["opt", "opt-350m-style", "bloom", "llama", "mistral", "qwen2", "gemma3"])
def test_parameter_counts_match_transformers(family):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config)
    shape = from_hf_config(config.to_dict())
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    layer = _first_layer(model)
    assert shape.linear_params() + shape.layer_fp16_params() == sum(p.numel() for p in layer.parameters())
    linear = sum(m.weight.numel() for m in layer.modules() if type(m).__name__ == "Linear")
    assert shape.linear_params() == linear


@pytest.mark.parametrize("bits", [16, 8, 6, 5, 4, 3, 2])
def test_gemma3_layer_bytes_match_a_loaded_quantized_layer(tmp_path, bits):
    """The planner's bytes of a Gemma 3 layer (q/k norms, four norms) are what a loaded shard holds."""
    import torch
    from tiny_models import build_checkpoint

    from planner.memory import element_bytes, layer_weight_bytes
    from pqmesh.model import ModelShard
    from pqmesh.model.loading import load_config
    from pqmesh.quant.layer import uniform_hook
    from pqmesh.quant.memory import measure_layer_bytes
    from pqmesh.types import Bits

    build_checkpoint("gemma3", tmp_path, layers=2)
    shape = from_hf_config(load_config(tmp_path).to_dict())
    assert shape.family == "gemma3"
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        shard = ModelShard.load(tmp_path, 0, 2, max_slots=1, max_len=4, dtype=dtype, layer_hook=uniform_hook(bits, 32))
        for layer in shard.layers:
            assert layer_weight_bytes(shape, Bits(bits), 32, element_bytes(name)) == measure_layer_bytes(layer)


def test_gemma_270m_is_built_in_and_its_fingerprint_is_new():
    from planner.catalog import builtin_model

    gemma, smol = builtin_model("gemma-3-270m"), builtin_model("smollm2-135m-instruct")
    assert gemma.family == "gemma3" and gemma.num_layers == 18 and gemma.layer_fp16_params() == 4 * 640 + 2 * 256
    # the fields Gemma added leave older shapes' fingerprints (stored in device profiles) as they were
    assert smol.fingerprint == "81fd4f361236071e"  # as computed before those fields existed
    assert builtin_model("opt-13b").fingerprint == "7e08437b4e1571ed"
    assert gemma.fingerprint != smol.fingerprint
