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


@pytest.mark.parametrize("family", ["opt", "opt-350m-style", "bloom", "llama"])
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
