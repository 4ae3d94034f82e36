"""A stage's slice of the model: decoder layers [start, end), embeddings on the first stage,
final norm and LM head on the last, and a static KV cache for its layers.

`ModelShard.load` builds every module on the meta device and reads only the tensors of its range,
so a stage never materializes the whole model. `prefill` takes a micro-batch of left-padded prompts
of different lengths; `decode` takes one token per sequence. Sequences are addressed by KV slot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from pqmesh.errors import InvalidArgument
from pqmesh.model.families import family_for
from pqmesh.model.family import Family
from pqmesh.model.kv_cache import AttentionStep, StaticKVCache
from pqmesh.model.loading import CheckpointReader, fill_module, load_config, storage_bytes
from pqmesh.types import Role

LayerHook = Callable[[int, nn.Module], nn.Module]
#: ``filler(global_index, meta_layer, reader, dtype, device)`` -> the layer with its tensors read.
LayerFiller = Callable[[int, nn.Module, CheckpointReader, torch.dtype, torch.device], nn.Module]


def _module_dict(parts: dict[str, tuple[nn.Module, str]]) -> nn.ModuleDict:
    return nn.ModuleDict({name: module for name, (module, _) in parts.items()})


class ModelShard(nn.Module):
    """Layers [start, end) of one model plus their KV cache; see module docstring."""

    def __init__(
        self,
        family: Family,
        start: int,
        end: int,
        layers: nn.ModuleList,
        embed: nn.ModuleDict | None,
        final: nn.ModuleDict | None,
        head: nn.Linear | None,
        cache: StaticKVCache,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.family, self.config = family, family.config
        self.start, self.end = start, end
        self.layers, self.embed, self.final, self.head = layers, embed, final, head
        self.runtime = family.runtime_modules(device)
        self.cache, self.dtype, self.device = cache, dtype, device
        self.checkpoint_bytes_read = 0  # set by `load`: bytes of checkpoint tensors this shard read

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start: int,
        end: int,
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        layer_hook: LayerHook | None = None,
        layer_filler: LayerFiller | None = None,
    ) -> "ModelShard":
        """Loads layers [start, end) from a safetensors checkpoint directory.

        ``layer_hook(global_index, layer)`` runs on each loaded layer (quantization swaps its linears).
        ``layer_filler`` replaces the plain read of a layer's tensors (a pre-quantized checkpoint
        stores packed codes instead of weights: `pqmesh.quant.checkpoint.layer_filler`).
        """
        config = load_config(Path(model_dir))
        family = family_for(config)
        total = config.num_hidden_layers
        if not 0 <= start < end <= total:
            raise InvalidArgument(
                f"layer range [{start}, {end}) must lie within the model's {total} layers and be non-empty"
            )
        if max_slots < 1 or max_len < 1:
            raise InvalidArgument(f"KV capacity must be positive, got {max_slots} slots x {max_len} tokens")
        device = torch.device(device)
        reader = CheckpointReader(model_dir)
        try:
            layers = nn.ModuleList()
            for index in range(start, end):
                with torch.device("meta"):
                    layer = family.build_layer(index)
                if layer_filler is None:
                    layer = fill_module(layer, f"{family.layer_prefix}{index}", reader, dtype, device)
                else:
                    layer = layer_filler(index, layer, reader, dtype, device)
                layers.append(layer_hook(index, layer) if layer_hook else layer)
            embed = final = head = None
            if start == 0:
                embed = cls._load_parts(family.build_embed, reader, dtype, device)
            if end == total:
                final = cls._load_parts(family.build_final, reader, dtype, device)
                head = cls._load_head(family, reader, dtype, device, embed)
            bytes_read = reader.bytes_read
        finally:
            reader.close()
        kv_heads, head_dim = family.kv_shape()
        cache = StaticKVCache(end - start, max_slots, max_len, kv_heads, head_dim, dtype, device)
        shard = cls(family, start, end, layers, embed, final, head, cache, dtype, device)
        shard.checkpoint_bytes_read = bytes_read
        return shard

    @staticmethod
    def _load_parts(build, reader, dtype, device) -> nn.ModuleDict:
        with torch.device("meta"):
            parts = build()
        for module, prefix in parts.values():
            fill_module(module, prefix, reader, dtype, device)
        return _module_dict(parts)

    @staticmethod
    def _load_head(family: Family, reader, dtype, device, embed: nn.ModuleDict | None) -> nn.Linear:
        config = family.config
        tied = getattr(config, "tie_word_embeddings", True)
        with torch.device("meta"):
            head = nn.Linear(family.head_width(), config.vocab_size, bias=False)
        if tied and embed is not None:  # first and last stage: share the embedding's storage
            head.weight = next(m.weight for m in embed.values() if isinstance(m, nn.Embedding))
            return head.eval()
        overrides = {"weight": family.embed_key()} if tied else None
        return fill_module(head, "lm_head", reader, dtype, device, overrides)

    @staticmethod
    def kv_shape(config) -> tuple[int, int]:
        """(kv heads, head dim) of one layer's cache for ``config``."""
        return family_for(config).kv_shape()

    @staticmethod
    def predict_weight_bytes(config, start: int, end: int, dtype: torch.dtype) -> int:
        """Bytes `load` will hold for [start, end) at 16 bits (no quantization), from the config
        alone: modules are built on the meta device and their tensors counted, nothing is read."""
        family = family_for(config)
        element = torch.empty((), dtype=dtype).element_size()
        with torch.device("meta"):
            modules = [family.build_layer(i) for i in range(start, end)]
            if start == 0:
                modules += [m for m, _ in family.build_embed().values()]
            if end == config.num_hidden_layers:
                modules += [m for m, _ in family.build_final().values()]
                tied_here = start == 0 and getattr(config, "tie_word_embeddings", True)
                if not tied_here:
                    modules.append(nn.Linear(family.head_width(), config.vocab_size, bias=False))
        return sum(t.numel() * element for m in modules for t in m.state_dict().values())

    # -- facts ------------------------------------------------------------------------------------
    @property
    def role(self) -> Role:
        return Role.of(self.start, self.end, self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def weight_bytes(self) -> int:
        """Bytes of distinct parameter and buffer storage (tied weights counted once), KV excluded."""
        return storage_bytes(self)

    # -- compute ----------------------------------------------------------------------------------
    def _check_inputs(self, inputs: torch.Tensor, batch: int, width: int | None) -> None:
        if self.embed is not None:
            expected = "int64 token ids of shape [batch, width]"
            ok = inputs.dtype == torch.long and inputs.dim() == 2
        else:
            expected = f"{self.dtype} hidden states of shape [batch, width, {self.hidden_size}]"
            ok = inputs.dtype == self.dtype and inputs.dim() == 3 and inputs.shape[2] == self.hidden_size
        ok = ok and inputs.shape[0] == batch and (width is None or inputs.shape[1] == width)
        if not ok:
            raise InvalidArgument(
                f"stage [{self.start}, {self.end}) expects {expected} for {batch} sequences; "
                f"got {inputs.dtype} of shape {tuple(inputs.shape)}"
            )
        vocab = self.config.vocab_size
        if self.embed is not None and inputs.numel() and not (0 <= int(inputs.min()) and int(inputs.max()) < vocab):
            raise InvalidArgument(f"token ids must be within 0..{vocab - 1} (the model's vocabulary); "
                                  f"got {int(inputs.min())}..{int(inputs.max())}")

    @torch.inference_mode()
    def _run(self, step: AttentionStep, inputs: torch.Tensor, last_only: bool) -> torch.Tensor:
        x = inputs.to(self.device)
        if self.embed is not None:
            x = self.family.embed(self.embed, x, step)
        extras = self.family.step_extras(self.runtime, step, self.dtype)
        for index, layer in enumerate(self.layers):
            x = self.family.layer(layer, index, x, step, extras)
        step.commit()
        if self.head is None:
            return x
        if last_only:
            x = x[:, -1:]
        return self.head(self.family.final(self.final, x)).float()

    def prefill(
        self, slots: Sequence[int], inputs: torch.Tensor, lengths: Sequence[int], all_logits: bool = False
    ) -> torch.Tensor:
        """Runs left-padded prompts into empty slots.

        Returns hidden states [B, T, H], or on the last stage float32 logits: [B, V] for each
        sequence's last token, or [B, T, V] with ``all_logits``.
        """
        self._check_inputs(inputs, len(slots), None)
        step = AttentionStep.for_prefill(self.cache, slots, lengths, inputs.shape[1], self.device)
        out = self._run(step, inputs, last_only=not all_logits)
        return out[:, -1] if self.head is not None and not all_logits else out

    def decode(self, slots: Sequence[int], inputs: torch.Tensor) -> torch.Tensor:
        """One token per slot: ids [B, 1] on the first stage, hidden [B, 1, H] after it.

        Returns hidden [B, 1, H], or float32 logits [B, V] on the last stage.
        """
        self._check_inputs(inputs, len(slots), 1)
        step = AttentionStep.for_decode(self.cache, slots, self.device)
        out = self._run(step, inputs, last_only=True)
        return out[:, -1] if self.head is not None else out

    def release(self, slots: Sequence[int]) -> int:
        return self.cache.release(slots)
