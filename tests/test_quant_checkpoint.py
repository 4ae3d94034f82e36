"""Pre-quantized checkpoints (`pqmesh quantize`): round trip, a stage reads only its layers, memory
prediction stays exact, and bad inputs get precise errors."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from quant_tiny import build_wide_checkpoint
from safetensors import safe_open

from pqmesh.errors import FailedPrecondition, InvalidArgument
from pqmesh.model import ModelShard
from pqmesh.model.loading import load_config
from pqmesh.quant import commands
from pqmesh.quant.checkpoint import layer_filler, read_quantized
from pqmesh.quant.layer import plan_hook
from pqmesh.quant.qlinear import QuantLinear
from pqmesh.types import Bits, Role
from stage_server.quantized import predict_shard_weight_bytes
from stage_server.runtime import ShardSpec, StageRuntime

TEXT = Path(__file__).parent / "data" / "quant_text.txt"
PLAN = [16, 4, 3, 2]


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide-llama")
    build_wide_checkpoint("llama", directory, layers=4, hidden=256)
    return directory


def quantize(source: Path, out: Path, bits: str, method: str, *extra: str) -> Path:
    calib = ["--calib", str(TEXT), "--samples", "4", "--seq-len", "64"] if method == "gptq" else []
    assert cli(["quantize", "--model", str(source), "--bits", bits, "--out", str(out), "--method", method,
                *calib, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def gptq_dir(source, tmp_path_factory):
    return quantize(source, tmp_path_factory.mktemp("q") / "gptq", ",".join(map(str, PLAN)), "gptq")


def test_rtn_checkpoint_reproduces_on_the_fly_quantization_exactly(source, tmp_path):
    stored = quantize(source, tmp_path / "rtn", ",".join(map(str, PLAN)), "rtn")
    info = read_quantized(stored)
    assert info.bits == tuple(Bits(b) for b in PLAN) and info.method == "rtn" and info.group_size == 128
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    fly = ModelShard.load(source, 0, 4, max_slots=2, max_len=24, layer_hook=plan_hook(PLAN, 0, 4))
    read = ModelShard.load(stored, 0, 4, max_slots=2, max_len=24, layer_filler=layer_filler(info, load_config(stored)))
    assert torch.equal(fly.prefill([0, 1], ids, [24, 24], all_logits=True),
                       read.prefill([0, 1], ids, [24, 24], all_logits=True))
    assert read.weight_bytes() == fly.weight_bytes()
    assert isinstance(read.layers[1].self_attn.q_proj, QuantLinear)
    assert read.layers[2].self_attn.q_proj.scale.dtype == torch.float16  # kept, not cast to the model dtype


def test_gptq_checkpoint_records_its_calibration_and_differs_from_rtn(source, gptq_dir):
    index = json.loads((gptq_dir / "model.safetensors.index.json").read_text())
    record = index["metadata"]["pqmesh"]
    assert record["format"] == "pqmesh-quantized" and record["version"] == 1 and record["bits"] == PLAN
    assert record["method"] == "gptq" and record["calibration"]["windows"] == 4
    assert (gptq_dir / "config.json").is_file() and (gptq_dir / "layer-00003.safetensors").is_file()
    info = read_quantized(gptq_dir)
    with safe_open(gptq_dir / "layer-00002.safetensors", framework="pt") as f:
        assert f.metadata()["pqmesh_bits"] == "3"
        codes_gptq = f.get_tensor("model.layers.2.mlp.down_proj.packed")
    fly = ModelShard.load(source, 2, 3, max_slots=1, max_len=8, layer_hook=plan_hook([3], 2, 3))
    assert codes_gptq.shape == fly.layers[0].mlp.down_proj.packed.shape
    assert not torch.equal(codes_gptq, fly.layers[0].mlp.down_proj.packed)
    assert info.bits[0] is Bits.B16


@pytest.mark.parametrize("start, end", [(0, 2), (2, 4), (1, 3)])
def test_stage_reads_only_its_layers_and_memory_prediction_is_exact(gptq_dir, start, end):
    index = json.loads((gptq_dir / "model.safetensors.index.json").read_text())["weight_map"]
    config = load_config(gptq_dir)
    mine = [f"model.layers.{i}." for i in range(start, end)]
    names = [n for n in index if any(n.startswith(p) for p in mine)]
    if start == 0:
        names.append("model.embed_tokens.weight")
    if end == 4:
        names += ["model.norm.weight", "lm_head.weight"]
    expected = 0
    for name in names:
        with safe_open(gptq_dir / index[name], framework="pt") as f:
            tensor = f.get_tensor(name)
            expected += tensor.numel() * tensor.element_size()
    info = read_quantized(gptq_dir)
    shard = ModelShard.load(gptq_dir, start, end, max_slots=1, max_len=8,
                            layer_filler=layer_filler(info, config))
    assert shard.checkpoint_bytes_read == expected
    bits = PLAN[start:end]
    assert shard.weight_bytes() == predict_shard_weight_bytes(config, start, end, bits, 128, torch.float32)


def test_stage_runtime_loads_a_prequantized_checkpoint(gptq_dir, tmp_path):
    shutil.copytree(gptq_dir, tmp_path / "wide-q")
    runtime = StageRuntime("cpu", 1 << 30, tmp_path)
    spec = ShardSpec("p", "wide-q", 2, 4, (3, 2), Role.LAST, 2, 16)
    result = runtime.load(spec)
    weights, _ = runtime.predict_bytes(spec, load_config(tmp_path / "wide-q"), torch.float32)
    assert result.weight_bytes + runtime._workspace == weights
    assert runtime.shard.layers[0].mlp.up_proj.bits is Bits.B3
    with pytest.raises(FailedPrecondition, match=r"quantized to \[3, 2\] bits for layers \[2, 4\).*asks \[4, 4\]"):
        runtime.load(ShardSpec("p", "wide-q", 2, 4, (4, 4), Role.LAST, 2, 16))
    with pytest.raises(FailedPrecondition, match="groups of 128 but the plan asks 64"):
        runtime.load(ShardSpec("p", "wide-q", 2, 4, (3, 2), Role.LAST, 2, 16, group_size=64))


def test_ppl_prints_a_plain_number_last_and_reads_quantized_checkpoints(source, gptq_dir, capsys):
    assert cli(["ppl", "--model", str(gptq_dir), "--bits", "16,4,3,2", "--text", str(TEXT), "--seq-len", "64",
                "--tokens", "512"]) == 0
    stored_lines = capsys.readouterr().out.strip().splitlines()
    assert cli(["ppl", "--model", str(source), "--bits", "16,4,3,2", "--text", str(TEXT), "--seq-len", "64",
                "--tokens", "512", "--method", "gptq", "--calib", str(TEXT), "--samples", "4"]) == 0
    fresh_lines = capsys.readouterr().out.strip().splitlines()
    for lines in (stored_lines, fresh_lines):
        details, last = json.loads(lines[-2]), float(lines[-1])
        assert math.isfinite(last) and last == pytest.approx(details["ppl"], rel=1e-5)
        assert details["tokens"] == 8 * 63
    assert float(stored_lines[-1]) == float(fresh_lines[-1])  # same calibration -> same checkpoint


def test_bad_inputs_get_precise_errors(source, gptq_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="unknown bitwidth '7'"):
        quantize(source, tmp_path / "a", "7", "rtn")
    with pytest.raises(InvalidArgument, match=r"holds \d+ tokens; 64 windows of 64 need 4096.*--samples 32"):
        quantize(source, tmp_path / "b", "4", "gptq", "--samples", "64")
    with pytest.raises(InvalidArgument, match="needs --calib"):
        cli(["quantize", "--model", str(source), "--bits", "4", "--out", str(tmp_path / "c")])
    with pytest.raises(FailedPrecondition, match="already quantized"):
        quantize(gptq_dir, tmp_path / "d", "4", "rtn")
    with pytest.raises(FailedPrecondition, match="not empty"):
        quantize(source, gptq_dir, "4", "rtn")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    other = tmp_path / "other"
    shutil.copytree(gptq_dir, other)
    build_wide_checkpoint("llama", tmp_path / "narrow", layers=4, hidden=128)
    shutil.copy(tmp_path / "narrow" / "config.json", other / "config.json")
    with pytest.raises(FailedPrecondition, match="describes another model"):
        read_quantized(other)
