"""The stage's execution core, without gRPC: load a shard within a memory budget, run micro-batches,
release KV slots, report state. The servicer decodes requests into these plain objects.

A load of a shard that differs from the one held only in its plan id or next hop (what a re-plan
changes for a stage that keeps its layers) keeps the weights and KV cache already in memory: it adopts
the new spec and frees every KV slot, instead of reading and quantizing the same tensors again
(`LoadResult.kept`; off with ``keep_unchanged=False``, the stage's ``--no-keep-shard``). It assumes
the checkpoint under the model id did not change on disk meanwhile.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
import torch

from pqmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from pqmesh.model import ModelShard
from pqmesh.model.kv_cache import StaticKVCache
from pqmesh.model.loading import load_config
from pqmesh.types import Phase, Role, parse_dtype
from stage_server.sampling import Sampling, sample

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class ShardSpec:
    plan_id: str
    model_id: str
    start: int
    end: int
    bits: tuple[int, ...]
    role: Role
    max_sequences: int
    max_tokens: int
    next_hop: str = ""
    dtype: str = ""
    group_size: int = 128


@dataclass
class MicroBatch:
    plan_id: str
    micro_batch_id: int
    phase: Phase
    slots: list[int]
    lengths: list[int]
    sampling: list[Sampling]
    tensor: torch.Tensor
    release_slots: list[int] = field(default_factory=list)  # freed before this micro-batch runs
    received_ns: int = field(default_factory=time.perf_counter_ns)


@dataclass
class Output:
    micro_batch_id: int
    slots: list[int]
    hidden: torch.Tensor | None  # to the next stage
    token_ids: list[int]  # from the last stage
    compute_ns: int
    queue_ns: int


@dataclass(frozen=True)
class LoadResult:
    weight_bytes: int
    kv_cache_bytes: int
    total_bytes: int
    load_seconds: float
    kept: bool = False  # the shard held already had these layers, bits and capacity: not read again


class StageRuntime:
    """One shard at a time; thread-safe (a lock serializes load, compute and release)."""

    def __init__(self, device: str, memory_budget: int, model_root: Path, keep_unchanged: bool = True) -> None:
        self.device = torch.device(device)
        self.keep_unchanged = keep_unchanged  # see the module docstring
        self.memory_budget = memory_budget
        self.model_root = Path(model_root).resolve()
        self.spec: ShardSpec | None = None
        self.shard: ModelShard | None = None
        self.micro_batches_done = 0
        self.tokens_done = 0
        self.micro_batches_dropped = 0  # counted by the Worker: their inbound stream broke before they ran
        self.released_in_band = self.released_by_rpc = 0
        self._workspace = 0  # predicted dequantization workspace of the loaded shard
        self._lock = threading.RLock()

    # -- loading ----------------------------------------------------------------------------------
    def model_dir(self, model_id: str) -> Path:
        # one plain path component, and its real path (symlinks followed) still inside the root:
        # a model id from the wire can never make this stage read outside --model-root
        if (model_id in ("", ".", "..") or Path(model_id).name != model_id or "\\" in model_id
                or not model_id.isprintable()):
            raise InvalidArgument(
                f"model id {model_id!r} must name a directory directly under the model root {self.model_root}"
            )
        candidate = self.model_root / model_id
        if not candidate.resolve().is_relative_to(self.model_root):
            raise InvalidArgument(f"model id {model_id!r} is a link to {candidate.resolve()}, outside the model root "
                                  f"{self.model_root}; move or copy the checkpoint under the root, or point "
                                  "--model-root at the directory that holds it")
        if not (candidate / "config.json").is_file():
            raise NotFound(f"no checkpoint {model_id!r} under {self.model_root} (expected {candidate}/config.json)")
        return candidate

    def _dtype(self, name: str) -> torch.dtype:
        if not name:
            return torch.float32 if self.device.type == "cpu" else torch.float16
        return getattr(torch, parse_dtype(name))

    def _validate(self, spec: ShardSpec, total_layers: int) -> None:
        if not 0 <= spec.start < spec.end <= total_layers:
            raise InvalidArgument(
                f"layer range [{spec.start}, {spec.end}) must be non-empty and within the model's {total_layers} layers"
            )
        if len(spec.bits) != spec.end - spec.start:
            raise InvalidArgument(f"{len(spec.bits)} bitwidths for {spec.end - spec.start} layers; give one per layer")
        role = Role.of(spec.start, spec.end, total_layers)
        if spec.role != role:
            raise InvalidArgument(
                f"layers [{spec.start}, {spec.end}) of {total_layers} make a {role.name.lower()} stage, "
                f"not {spec.role.name.lower()}"
            )
        if role in (Role.FIRST, Role.MIDDLE) and not spec.next_hop:
            raise InvalidArgument(f"a {role.name.lower()} stage needs next_hop (host:port of the following stage)")
        if spec.max_sequences < 1 or spec.max_tokens < 1:
            raise InvalidArgument("max_sequences and max_tokens_per_sequence must be positive")

    def predict_bytes(self, spec: ShardSpec, config, dtype: torch.dtype) -> tuple[int, int]:
        """(weight + workspace bytes, KV cache bytes) the shard will hold, computed before allocating."""
        from stage_server.quantized import predict_shard_weight_bytes, predict_workspace_bytes

        weights = predict_shard_weight_bytes(config, spec.start, spec.end, spec.bits, spec.group_size, dtype)
        weights += predict_workspace_bytes(config, spec.bits, dtype)
        kv_heads, head_dim = ModelShard.kv_shape(config)
        kv = StaticKVCache.bytes_needed(
            spec.end - spec.start, spec.max_sequences, spec.max_tokens, kv_heads, head_dim, dtype
        )
        return weights, kv

    def load(self, spec: ShardSpec) -> LoadResult:
        from stage_server.quantized import predict_workspace_bytes, shard_loading

        directory = self.model_dir(spec.model_id)
        config = load_config(directory)
        self._validate(spec, config.num_hidden_layers)
        dtype = self._dtype(spec.dtype)
        weights, kv = self.predict_bytes(spec, config, dtype)
        loading = shard_loading(directory, config, spec.start, spec.bits, spec.group_size)
        if weights + kv > self.memory_budget:
            raise FailedPrecondition(
                f"shard [{spec.start}, {spec.end}) of {spec.model_id} needs {weights + kv} bytes "
                f"(weights {weights} + KV cache {kv} for {spec.max_sequences} sequences x {spec.max_tokens} tokens) "
                f"but this stage's memory budget is {self.memory_budget} bytes: "
                f"short by {weights + kv - self.memory_budget}; "
                "use fewer layers, lower bits, fewer sequences or shorter sequences"
            )
        with self._lock:
            if self._unchanged(spec):
                return self._adopt(spec)
            self._unload()
            started = time.perf_counter()
            shard = ModelShard.load(
                directory, spec.start, spec.end, max_slots=spec.max_sequences, max_len=spec.max_tokens,
                dtype=dtype, device=self.device, **loading,
            )
            self.shard, self.spec = shard, spec
            self.micro_batches_done = self.tokens_done = 0
            self._workspace = predict_workspace_bytes(config, spec.bits, dtype)
            weights_held = shard.weight_bytes()
            result = LoadResult(weights_held, shard.cache.nbytes, weights_held + self._workspace + shard.cache.nbytes,
                                time.perf_counter() - started)
        log.info("shard_loaded", plan_id=spec.plan_id, model_id=spec.model_id, layers=[spec.start, spec.end],
                 predicted_bytes=weights + kv, total_bytes=result.total_bytes, seconds=round(result.load_seconds, 3))
        return result

    def _unchanged(self, spec: ShardSpec) -> bool:
        """The shard held is ``spec`` but for its plan id and next hop (and keeping is on)."""
        held = self.spec
        return (self.keep_unchanged and held is not None and self.shard is not None
                and replace(held, plan_id=spec.plan_id, next_hop=spec.next_hop) == spec)

    def _adopt(self, spec: ShardSpec) -> LoadResult:
        """Keeps the loaded weights and KV cache under ``spec``: every slot freed, counters reset as by a load."""
        started = time.perf_counter()
        shard, previous = self.shard, self.spec.plan_id
        shard.release(range(shard.cache.num_slots))
        self.spec = spec
        self.micro_batches_done = self.tokens_done = 0
        weights_held = shard.weight_bytes()
        result = LoadResult(weights_held, shard.cache.nbytes, weights_held + self._workspace + shard.cache.nbytes,
                            time.perf_counter() - started, kept=True)
        log.info("shard_kept", plan_id=spec.plan_id, previous_plan_id=previous, model_id=spec.model_id,
                 layers=[spec.start, spec.end], next_hop=spec.next_hop, total_bytes=result.total_bytes)
        return result

    def _unload(self) -> None:
        if self.shard is not None:
            log.info("shard_unloaded", plan_id=self.spec.plan_id)
        self.shard = self.spec = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _require(self, plan_id: str) -> tuple[ModelShard, ShardSpec]:
        if self.shard is None:
            raise FailedPrecondition(f"no shard is loaded on this stage (plan {plan_id!r}); call LoadShard first")
        if plan_id != self.spec.plan_id:
            raise FailedPrecondition(
                f"this stage holds plan {self.spec.plan_id!r}, not {plan_id!r}; load the plan first"
            )
        return self.shard, self.spec

    # -- running ----------------------------------------------------------------------------------
    def execute(self, batch: MicroBatch) -> Output:
        with self._lock:
            shard, _ = self._require(batch.plan_id)
            started = time.perf_counter_ns()
            if batch.release_slots:  # finished sequences' slots, freed in stream order before any reuse
                self.released_in_band += shard.release(batch.release_slots)
            if len(batch.lengths) != len(batch.slots):
                raise InvalidArgument(f"{len(batch.slots)} slots but {len(batch.lengths)} lengths")
            if batch.sampling and len(batch.sampling) != len(batch.slots):
                raise InvalidArgument(
                    f"{len(batch.slots)} slots but {len(batch.sampling)} sampling settings; give one per slot or none"
                )
            if batch.phase is Phase.PREFILL:
                result = shard.prefill(batch.slots, batch.tensor, batch.lengths)
                positions, tokens = list(batch.lengths), sum(batch.lengths)
            else:
                shard.cache.check_slots(batch.slots)
                held = [shard.cache.lengths[s] for s in batch.slots]
                if held != list(batch.lengths):
                    raise FailedPrecondition(
                        f"slots {batch.slots} hold {held} tokens but the micro-batch says {batch.lengths}"
                    )
                try:
                    tokens_in = batch.tensor.view(len(batch.slots), 1, *batch.tensor.shape[2:])
                except RuntimeError:
                    raise InvalidArgument(f"a decode micro-batch carries one position per sequence ({len(batch.slots)} "
                                          f"sequences); got a tensor of shape {tuple(batch.tensor.shape)}") from None
                result = shard.decode(batch.slots, tokens_in)
                positions, tokens = [n + 1 for n in batch.lengths], len(batch.slots)
            token_ids, hidden = [], None
            if shard.head is not None:
                params = batch.sampling or [Sampling()] * len(batch.slots)
                token_ids = sample(result, params, positions)
            else:
                hidden = result
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.micro_batches_done += 1
            self.tokens_done += tokens
            done = time.perf_counter_ns()
        return Output(batch.micro_batch_id, batch.slots, hidden, token_ids, done - started, started - batch.received_ns)

    def release(self, plan_id: str, slots: list[int]) -> int:
        with self._lock:
            shard, _ = self._require(plan_id)
            released = shard.release(slots)
            self.released_by_rpc += released
            return released

    def kv_slots(self) -> tuple[int, int]:
        """(used, total) KV slots, read without the lock (for metrics scrapes during compute)."""
        shard = self.shard
        return (shard.cache.slots_used, shard.cache.num_slots) if shard is not None else (0, 0)

    def info(self) -> dict:
        with self._lock:
            used = self.shard.weight_bytes() + self._workspace + self.shard.cache.nbytes if self.shard else 0
            out = {"device": str(self.device), "memory_budget_bytes": self.memory_budget, "memory_used_bytes": used,
                   "micro_batches_done": self.micro_batches_done, "tokens_done": self.tokens_done,
                   "micro_batches_dropped": self.micro_batches_dropped, "slots_released_in_band": self.released_in_band,
                   "slots_released_by_rpc": self.released_by_rpc}
            if self.shard is not None:
                out.update(plan_id=self.spec.plan_id, model_id=self.spec.model_id, start=self.spec.start,
                           end=self.spec.end, role=self.spec.role, kv_slots_total=self.shard.cache.num_slots,
                           kv_slots_used=self.shard.cache.slots_used)
            return out
