"""Per-layer sensitivity to quantization: the table the planner reads (LLM-PQ's indicator).

*variance* (default, cheap): rounding a weight to a grid of step ``s`` leaves an error uniform in
``[-s/2, s/2]``, of variance ``s**2 / 12``. For ``y = W x`` with independent errors, output ``i``
gets error variance ``sum_j var(dW_ij) E[x_j**2]``, so one linear contributes

    (1 / 12) * sum over rows n and groups g of  s[n, g]**2 * sum_{j in g} E[x_j**2]

with ``s`` the steps our quantizer really picks (`quantize_weight`, clipping included) and
``E[x_j**2]`` the second moment of input channel ``j`` over *all* calibration tokens (sums of squares
and a token count accumulate across micro-batches; the mean is taken once at the end). A layer's
indicator is the sum over its linears: the expected squared error added to its output per token.
LLM-PQ's own formula uses one step per tensor (its range over ``2**(b-1) - 1``) and the input
variance; ours is the same estimate at group granularity, for our asymmetric quantizer.

*direct*: each layer quantized for real and run on the same calibration inputs as the 16-bit layer;
the value is ``sum ||y_q - y||**2 / sum ||y||**2`` over all calibration tokens (the relative squared
error of the layer's output).

File format, version 1 (JSON): ``{"version": 1, "model", "kind", "group_size", "samples",
"seq_len", "tokens", "layers": [{"layer": i, "bits": {"16": 0.0, "8": x, ...}}]}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import structlog
import torch
from torch import nn

from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.quant.bits import Bits, parse_bits_list
from pqmesh.quant.calibrate import LayerwiseRunner
from pqmesh.quant.layer import DEFAULT_GROUP_SIZE, linear_children, quantize_layer
from pqmesh.quant.qlinear import Workspace, quantize_weight

log = structlog.get_logger(__name__)

VERSION = 1
KINDS = ("variance", "direct")


@dataclass(frozen=True)
class IndicatorTable:
    """Indicator value per layer and bitwidth; 16 bits is always 0."""

    model: str
    kind: str
    group_size: int
    values: tuple[dict[Bits, float], ...]
    samples: int = 0
    seq_len: int = 0
    tokens: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.values)

    def value(self, layer: int, bits: Bits | int | str) -> float:
        bits = Bits.parse(bits)
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer {layer} is outside the indicator table's {self.num_layers} layers")
        if not bits.quantized:
            return 0.0
        if bits not in self.values[layer]:
            have = sorted(b.count for b in self.values[layer])
            raise InvalidArgument(f"the indicator table has no {bits.count}-bit value (it has {have}); rerun `pqmesh indicator --bits`")
        return self.values[layer][bits]

    def to_json(self) -> dict:
        return {
            "version": VERSION, "model": self.model, "kind": self.kind, "group_size": self.group_size,
            "samples": self.samples, "seq_len": self.seq_len, "tokens": self.tokens, **self.meta,
            "layers": [
                {"layer": i, "bits": {str(b.count): v for b, v in sorted(row.items(), key=lambda kv: -kv[0].count)}}
                for i, row in enumerate(self.values)
            ],
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "indicator") -> "IndicatorTable":
        if not isinstance(data, dict) or data.get("version") != VERSION:
            found = data.get("version") if isinstance(data, dict) else None
            raise InvalidArgument(f"{source}: version {found!r}, this build reads version {VERSION}; regenerate it with `pqmesh indicator`")
        if data.get("kind") not in KINDS:
            raise InvalidArgument(f"{source}: kind must be one of {KINDS}, got {data.get('kind')!r}")
        rows = data.get("layers")
        if not isinstance(rows, list) or not rows:
            raise InvalidArgument(f"{source}: 'layers' must be a non-empty list")
        values = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or row.get("layer") != i or not isinstance(row.get("bits"), dict):
                raise InvalidArgument(f"{source}: entry {i} must be {{'layer': {i}, 'bits': {{...}}}}")
            parsed = {Bits.parse(k): float(v) for k, v in row["bits"].items()}
            bad = {b.count: v for b, v in parsed.items() if not math.isfinite(v) or v < 0}
            if bad:
                raise InvalidArgument(f"{source}: layer {i} has negative or non-finite values {bad}")
            parsed[Bits.B16] = 0.0
            values.append(parsed)
        known = {"version", "model", "kind", "group_size", "samples", "seq_len", "tokens", "layers"}
        return cls(
            model=str(data.get("model", "")), kind=data["kind"], group_size=int(data.get("group_size", DEFAULT_GROUP_SIZE)),
            values=tuple(values), samples=int(data.get("samples", 0)), seq_len=int(data.get("seq_len", 0)),
            tokens=int(data.get("tokens", 0)), meta={k: v for k, v in data.items() if k not in known},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_indicator(path: str | Path) -> IndicatorTable:
    """Reads and validates an indicator file written by `pqmesh indicator`."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"indicator file {path} does not exist; create it with `pqmesh indicator`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"indicator file {path} is not valid JSON: {err}") from err
    return IndicatorTable.from_json(data, str(path))


class SecondMoments:
    """Per-channel sums of squares of every linear's input over all tokens it saw, and the count."""

    def __init__(self, layer: nn.Module) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [slot.linear.register_forward_pre_hook(self._hook(slot.name)) for slot in linear_children(layer)]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            add = torch.sum(x.float().square(), dim=0, dtype=torch.float64)
            self.sums[name] = self.sums[name] + add if name in self.sums else add
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return hook

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def variance_indicator(layer: nn.Module, moments: SecondMoments, bits: Bits, group_size: int) -> float:
    """Sum over the layer's linears of (1/12) sum_{n,g} s[n,g]^2 sum_{j in g} E[x_j^2]."""
    total = 0.0
    for slot in linear_children(layer):
        q = quantize_weight(slot.linear.weight, bits, group_size)
        x2 = moments.mean(slot.name).to(q.scale.device)
        per_group = x2.view(-1, q.group_size).sum(dim=-1)  # [groups]
        total += float((q.scale.double().square() @ per_group).sum()) / 12.0
    return total


def compute_indicator(
    runner: LayerwiseRunner,
    bits: Sequence[Bits | int | str] = (8, 4, 3, 2),
    kind: str = "variance",
    group_size: int = DEFAULT_GROUP_SIZE,
    model_name: str = "",
) -> IndicatorTable:
    """Runs the runner's windows through every layer and returns the indicator table."""
    if kind not in KINDS:
        raise InvalidArgument(f"indicator kind must be one of {KINDS}, got {kind!r}")
    widths = [b for b in parse_bits_list(bits) if b.quantized]
    if not widths:
        raise InvalidArgument("give at least one of 8, 4, 3, 2 bits to rate")
    values = []
    for index in range(runner.num_layers):
        layer = runner.load_layer(index)
        moments = SecondMoments(layer) if kind == "variance" else None
        quantized = {b: quantize_layer(runner.load_layer(index), b, group_size, Workspace()) for b in widths} if kind == "direct" else {}
        err = {b: 0.0 for b in widths}
        energy, outputs = 0.0, []
        for part in runner.batches():
            x = runner.hidden[part]
            y = runner.forward(layer, x)
            outputs.append(y)
            energy += float(y.double().square().sum())
            for b, q_layer in quantized.items():
                err[b] += float((runner.forward(q_layer, x) - y).double().square().sum())
        if moments is not None:
            moments.remove()
            row = {b: variance_indicator(layer, moments, b, group_size) for b in widths}
        else:
            row = {b: err[b] / energy if energy > 0 else 0.0 for b in widths}
        row[Bits.B16] = 0.0
        values.append(row)
        runner.advance(outputs)
        log.info("indicator_layer", layer=index, kind=kind, **{f"b{b.count}": v for b, v in row.items() if b.quantized})
    windows, width = runner.hidden.shape[0], runner.width
    return IndicatorTable(model_name or runner.model_dir.name, kind, group_size, tuple(values), windows, width, windows * width)
