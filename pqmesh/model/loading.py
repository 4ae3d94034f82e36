"""Read just the tensors a stage needs from a safetensors checkpoint directory.

Handles a single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Modules are built on the meta device by the caller and filled here with ``assign=True``, so no
tensor outside the stage's layer range is ever read or allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from pqmesh.errors import FailedPrecondition, NotFound

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_config(model_dir: Path) -> PretrainedConfig:
    if not (Path(model_dir) / "config.json").is_file():
        raise NotFound(f"{model_dir} has no config.json; point at a Hugging Face checkpoint directory")
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


class CheckpointReader:
    """Maps tensor names to files and reads tensors one at a time; counts what it read."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.model_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._files = {name: single for name in f.keys()}
        else:
            raise NotFound(f"{self.model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0
        self.tensors_read = 0

    def names(self) -> list[str]:
        return list(self._files)

    def resolve(self, name: str) -> str | None:
        """The stored name for a canonical one; accepts checkpoints saved from the base model
        (``decoder.layers.0...`` for ``model.decoder.layers.0...``, ``h.0...`` for ``transformer.h.0...``)."""
        parts = name.split(".")
        for cut in range(len(parts)):
            candidate = ".".join(parts[cut:])
            if candidate in self._files:
                return candidate
        return None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def get(self, name: str) -> torch.Tensor:
        stored = self.resolve(name)
        if stored is None:
            raise FailedPrecondition(f"checkpoint {self.model_dir} has no tensor {name!r}")
        path = self._files[stored]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt")
        tensor = handle.get_tensor(stored)
        self.bytes_read += tensor.nbytes
        self.tensors_read += 1
        return tensor

    def close(self) -> None:
        self._handles.clear()


def fill_module(
    module: nn.Module,
    prefix: str,
    reader: CheckpointReader,
    dtype: torch.dtype,
    device: torch.device | str,
    overrides: dict[str, str] | None = None,
    keep_dtype: frozenset[str] = frozenset(),
) -> nn.Module:
    """Replaces the meta tensors of ``module`` by checkpoint tensors named ``prefix.<key>``.

    ``overrides`` maps a local key to another checkpoint name (a tied LM head reads the embedding).
    Floating tensors take ``dtype``, except the keys in ``keep_dtype`` (which must be stored in the
    dtype of their meta tensor, e.g. fp16 quantization scales); all land on ``device``.
    """
    overrides = overrides or {}
    state = {}
    for key, meta in module.state_dict(keep_vars=True).items():
        tensor = reader.get(overrides.get(key, f"{prefix}.{key}"))
        if tuple(tensor.shape) != tuple(meta.shape):
            raise FailedPrecondition(
                f"checkpoint tensor {prefix}.{key} has shape {tuple(tensor.shape)}, config expects {tuple(meta.shape)}"
            )
        if key in keep_dtype:
            if tensor.dtype != meta.dtype:
                raise FailedPrecondition(
                    f"checkpoint tensor {prefix}.{key} is {tensor.dtype}, the format stores {meta.dtype}"
                )
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.to(device)
    module.load_state_dict(state, assign=True, strict=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise FailedPrecondition(f"tensors {left} of {prefix} were not found in the checkpoint")
    return module.eval().requires_grad_(False)


def storage_bytes(module: nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage in ``module`` (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
