"""Quantized layers inside real shards: memory prediction vs measurement, output error per bitwidth
on layers wide enough for real groups, and mixed-bit generation through a two-shard pipeline."""

from __future__ import annotations

import random

import pytest
import torch
from quant_tiny import WIDE_FAMILIES, build_wide_checkpoint
from tiny_models import build_checkpoint, reference_greedy

from pqmesh.errors import InvalidArgument
from pqmesh.model import LocalPipeline, ModelShard
from pqmesh.model.loading import load_config
from pqmesh.quant.layer import linear_children, plan_hook, uniform_hook
from pqmesh.quant.memory import measure_layer_bytes, predict_layer_bytes, workspace_bytes
from pqmesh.quant.qlinear import QuantLinear, Workspace
from pqmesh.types import Bits

ALL_BITS = [16, 8, 6, 5, 4, 3, 2]


@pytest.fixture(scope="module", params=WIDE_FAMILIES)
def wide_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"wide-{request.param}")
    build_wide_checkpoint(request.param, directory, layers=2)
    return directory


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt", "opt-350m-style", "bloom", "gemma3"])
def test_predicted_bytes_match_measured_tiny(tmp_path, family):
    build_checkpoint(family, tmp_path, layers=1)
    config = load_config(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        for bits in ALL_BITS:
            for group in (32, 128):
                hook = uniform_hook(bits, group)
                shard = ModelShard.load(tmp_path, 0, 1, max_slots=1, max_len=4, dtype=dtype, layer_hook=hook)
                measured = measure_layer_bytes(shard.layers[0])
                predicted = predict_layer_bytes(config, bits, group, dtype)
                assert abs(predicted - measured) <= 0.03 * measured, (
                    f"{family} {bits}b g{group}: {predicted} vs {measured}"
                )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_predicted_bytes_match_measured_wide(wide_dir, dtype):
    config = load_config(wide_dir)
    sizes = {}
    for bits in ALL_BITS:
        shard = ModelShard.load(wide_dir, 1, 2, max_slots=1, max_len=4, dtype=dtype, layer_hook=uniform_hook(bits))
        measured = measure_layer_bytes(shard.layers[0])
        assert abs(predict_layer_bytes(config, bits, 128, dtype) - measured) <= 0.03 * measured
        sizes[bits] = measured
    assert sizes[16] > sizes[8] > sizes[6] > sizes[5] > sizes[4] > sizes[3] > sizes[2]
    params = sum(
        s.linear.weight.numel()
        for s in linear_children(ModelShard.load(wide_dir, 0, 1, max_slots=1, max_len=4).layers[0])
    )
    assert sizes[4] < params * (4 + 0.5) / 8 + 4 * 256 * 4  # ~4 bits + fp16 scale/offset per 128 + norms


def test_workspace_is_one_buffer_per_stage(wide_dir):
    config = load_config(wide_dir)
    for bits in (8, 5, 3):
        workspace = Workspace()
        shard = ModelShard.load(wide_dir, 0, 2, max_slots=1, max_len=8, layer_hook=uniform_hook(bits, 128, workspace))
        shard.prefill([0], torch.tensor([[5, 6, 7]]), [3])
        assert workspace.nbytes == workspace_bytes(config, torch.float32, bits) > 0
    assert workspace_bytes(config, torch.float32, 16) == 0
    # the second bit plane unpacks through the weight buffer: a two-plane width needs no more room
    # than 4 bits where the rows pad alike (every width here is a multiple of 8)
    four = workspace_bytes(config, torch.float32, 4)
    assert {workspace_bytes(config, torch.float32, b) for b in (6, 5, 4, 3)} == {four}


# -- output error ----------------------------------------------------------------------------------
def _layer_errors(directory) -> tuple[dict[int, float], dict[int, float]]:
    """(linear-output error, decoder-layer-output error) per bitwidth on layer 0 of random prompts."""
    ids = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    lengths = [40, 40, 40]

    def run(bits):
        shard = ModelShard.load(directory, 0, 1, max_slots=3, max_len=40, layer_hook=uniform_hook(bits))
        inputs = {}
        hooks = [slot.linear.register_forward_pre_hook(lambda m, a, n=slot.name: inputs.setdefault(n, a[0].clone()))
                 for slot in linear_children(shard.layers[0])] if bits == 16 else []
        out = shard.prefill([0, 1, 2], ids, lengths)
        for h in hooks:
            h.remove()
        return shard, out, inputs

    base, ref, inputs = run(16)
    originals = {slot.name: slot.linear for slot in linear_children(base.layers[0])}
    linear_err, layer_err = {}, {}
    for bits in [8, 6, 5, 4, 3, 2]:
        shard, out, _ = run(bits)
        num = den = 0.0
        for name, module in shard.layers[0].named_modules():
            if isinstance(module, QuantLinear):
                x = inputs[name]
                exact = originals[name](x)
                num += (module(x) - exact).square().sum().item()
                den += exact.square().sum().item()
        linear_err[bits] = (num / den) ** 0.5
        layer_err[bits] = ((out - ref).norm() / ref.norm()).item()
    return linear_err, layer_err


def test_output_error_bounded_and_monotone(wide_dir):
    linear_err, layer_err = _layer_errors(wide_dir)
    assert linear_err[8] < 0.01 and linear_err[4] < 0.10 and linear_err[3] < 0.25 and linear_err[2] < 0.6, linear_err
    assert linear_err[2] > linear_err[3] > linear_err[4] > linear_err[5] > linear_err[6] > linear_err[8] > 0
    assert layer_err[2] > layer_err[3] > layer_err[4] > layer_err[5] > layer_err[6] > layer_err[8] > 0, layer_err
    assert layer_err[8] < 0.02, layer_err


# -- generation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen-llama")
    model = build_checkpoint("llama", directory, layers=4)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 9, 2, 7)]
    return directory, prompts, reference_greedy(model, prompts, 8)


def _pipeline(directory, plan, cuts=(0, 2, 4)):
    return LocalPipeline([
        ModelShard.load(directory, a, b, max_slots=4, max_len=32, layer_hook=plan_hook(plan[a:b], a, b, group_size=32))
        for a, b in zip(cuts, cuts[1:])
    ])


def test_sixteen_bits_through_hook_gives_exact_tokens(tiny_llama):
    directory, prompts, expected = tiny_llama
    assert _pipeline(directory, [16] * 4).generate_greedy(prompts, 8, 2, 4) == expected


def test_mixed_bits_across_two_shards_generate(tiny_llama):
    directory, prompts, expected = tiny_llama
    pipe = _pipeline(directory, [8, 4, 3, 16])
    kinds = [
        [type(m).__name__ for m in layer.modules() if isinstance(m, (QuantLinear, torch.nn.Linear))]
        for s in pipe.shards
        for layer in s.layers
    ]
    assert [k[0] for k in kinds] == ["QuantLinear", "QuantLinear", "QuantLinear", "Linear"]
    assert [m.bits for s in pipe.shards for layer in s.layers for m in layer.modules() if isinstance(m, QuantLinear)][
        ::7
    ] == [Bits.B8, Bits.B4, Bits.B3]
    got = pipe.generate_greedy(prompts, 8, 2, 4)
    assert [len(t) for t in got] == [8] * 4 and all(0 <= t < 256 for seq in got for t in seq)
    eight = _pipeline(directory, [8] * 4).generate_greedy(prompts, 8, 2, 4)
    assert sum(a == b for x, y in zip(eight, expected) for a, b in zip(x, y)) >= 0.75 * 32  # 8-bit ~ exact


def test_plan_hook_rejects_wrong_length_and_range():
    with pytest.raises(InvalidArgument, match="give exactly 2"):
        plan_hook([4, 4, 4], 0, 2)
    hook = plan_hook([4, 4], 2, 4)
    with pytest.raises(InvalidArgument, match="outside the planned range"):
        hook(0, torch.nn.Linear(2, 2))
