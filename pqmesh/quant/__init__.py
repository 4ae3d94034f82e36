"""Per-layer weight-only quantization (16/8/4/3/2 bits), its memory accounting, the sensitivity
indicator and its file, and the perplexity tool.

Import from the modules (this package imports nothing, so the torch-free `indicator_file` and
`bit_plan` stay cheap to load): `qlinear` (`QuantLinear`, `quantize_weight`), `layer`
(`quantize_layer`; `plan_hook` / `uniform_hook` plug into ``ModelShard.load(layer_hook=...)`` so each
decoder layer is quantized right after it is read), `memory` (`predict_layer_bytes`, exact against
`measure_layer_bytes`; the planner's own torch-free byte model in `planner.memory` is tested equal to
it), `indicator` (computing sensitivities), `indicator_file` (reading and writing them), `bit_plan`
(per-layer plans as users type them), `ppl` (perplexity), `gptq` (calibrated quantization of one
linear, same format), `calibrated` (a decoder layer from calibration activations), `checkpoint`
(the pre-quantized checkpoint format and its loader) and `quantize` (writing one, layer by layer).
"""
