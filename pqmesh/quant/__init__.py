"""Per-layer weight-only quantization (16/8/4/3/2 bits), its memory accounting, the sensitivity
indicator the planner reads, and the perplexity tool.

`quantize_layer` / `plan_hook` plug into ``ModelShard.load(layer_hook=...)`` so each decoder layer is
quantized right after it is read; `predict_layer_bytes` is what the planner budgets with.
"""

from pqmesh.quant.bits import Bits, describe_plan, parse_bits_list, parse_bits_spec
from pqmesh.quant.indicator import IndicatorTable, load_indicator
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE, plan_hook, quantize_layer, uniform_hook
from pqmesh.quant.memory import layer_shape, measure_layer_bytes, predict_layer_bytes, workspace_bytes
from pqmesh.quant.qlinear import QuantLinear, Workspace, effective_group_size, quantize_weight

__all__ = [
    "Bits",
    "DEFAULT_GROUP_SIZE",
    "IndicatorTable",
    "QuantLinear",
    "Workspace",
    "describe_plan",
    "effective_group_size",
    "layer_shape",
    "load_indicator",
    "measure_layer_bytes",
    "parse_bits_list",
    "parse_bits_spec",
    "plan_hook",
    "predict_layer_bytes",
    "quantize_layer",
    "quantize_weight",
    "uniform_hook",
    "workspace_bytes",
]
