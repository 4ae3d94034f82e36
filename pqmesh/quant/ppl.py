"""Perplexity of a per-layer bit plan on a text file, through a `ModelShard` holding all layers.

A plain checkpoint is quantized on the fly (round-to-nearest); a pre-quantized one (`pqmesh
quantize`) is read as stored, and the plan must equal its stored bits.

The text is cut into non-overlapping windows of ``seq_len`` tokens; each window is one sequence
(no context carried over; it starts with BOS when the tokenizer adds one by default,
`pqmesh.quant.calibrate.bos_token`), every token after the first in a window is predicted, and
perplexity is ``exp(total negative log-likelihood / predicted tokens)`` over all windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from pqmesh.errors import InvalidArgument
from pqmesh.model import ModelShard
from pqmesh.model.loading import load_config
from pqmesh.quant.bit_plan import describe_plan
from pqmesh.quant.checkpoint import layer_filler, read_quantized
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE, plan_hook
from pqmesh.types import Bits, parse_bits_list


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    bits: str  # describe_plan form: "4" or "16,8,4,..."
    group_size: int
    weight_bytes: int  # the shard's parameters and buffers (all layers, embeddings, head)
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def nll_sum(shard: ModelShard, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ``targets[:, 1:]`` given all logits of ``inputs`` (ids, or hidden states for a
    shard that starts mid-model), windows of equal length; returns (sum, predicted tokens)."""
    batch, width = targets.shape
    slots = list(range(batch))
    logits = shard.prefill(slots, inputs, [width] * batch, all_logits=True)
    shard.release(slots)
    vocab = logits.shape[-1]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), targets[:, 1:].reshape(-1).to(logits.device), reduction="sum"
    )
    return float(loss), batch * (width - 1)


def perplexity(
    model_dir: str | Path,
    plan: Sequence[Bits | int | str],
    windows: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    batch: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PerplexityResult:
    """Perplexity of ``windows`` ([n, seq_len] token ids) with layer ``i`` at ``plan[i]`` bits."""
    plan = parse_bits_list(plan)
    if batch < 1:
        raise InvalidArgument(f"batch must be at least 1, got {batch}")
    start = time.perf_counter()
    width = windows.shape[1]
    stored = read_quantized(model_dir)
    if stored is not None:  # a pre-quantized checkpoint: read as stored, no quantization here
        stored.check_plan(0, plan, str(model_dir))
        group_size = stored.group_size
        loading = {"layer_filler": layer_filler(stored, load_config(Path(model_dir)))}
    else:
        loading = {"layer_hook": plan_hook(plan, 0, len(plan), group_size)}
    shard = ModelShard.load(
        model_dir, 0, len(plan), max_slots=batch, max_len=width, dtype=dtype, device=device, **loading
    )
    if shard.head is None:
        raise InvalidArgument(
            f"the plan has {len(plan)} entries but the model has {shard.config.num_hidden_layers} layers; "
            "give one per layer"
        )
    total, count = 0.0, 0
    for first in range(0, windows.shape[0], batch):
        ids = windows[first:first + batch]
        loss, n = nll_sum(shard, ids, ids)
        total, count = total + loss, count + n
    nll = total / count
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, tokens=count, windows=windows.shape[0], seq_len=width,
        bits=describe_plan(plan), group_size=group_size, weight_bytes=shard.weight_bytes(),
        seconds=time.perf_counter() - start,
    )
