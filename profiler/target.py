"""What is profiled: the model (its Hugging Face config and the planner's name for its shape) and the
device (torch device, a stable name for cache keys, total memory, default dtype).

The model may be a built-in planner name ("opt-30b"), the embedded model's name
("smollm2-135m-instruct", prepared on first use), a config.json, a checkpoint directory or inline
config JSON. The shape name is derived exactly as `pqmesh plan --model` derives it, so the profile's
`model` field matches and the planner uses its fitted entries.
"""

from __future__ import annotations

import json
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.catalog import BUILTIN_CONFIGS, canonical_name, model_from_config_json
from planner.model_shapes import ModelShape
from pqmesh.errors import FailedPrecondition, InvalidArgument

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelTarget:
    """`config` is the config.json dict the timed layers are built from; `shape.name` is the planner's name."""

    source: str
    config: dict
    shape: ModelShape

    @property
    def name(self) -> str:
        return self.shape.name

    def hf_config(self, layers: int):
        """A transformers config of this model with `layers` decoder layers (the timed shard's)."""
        from transformers import AutoConfig

        data = {
            k: v
            for k, v in self.config.items()
            if not k.startswith("_") and k not in ("architectures", "transformers_version")
        }
        kind = data.pop("model_type")
        data["n_layer" if kind == "bloom" else "num_hidden_layers"] = layers
        return AutoConfig.for_model(kind, **data)


def _embedded_dir() -> Path:
    from pqmesh.model.embedded import prepare

    return prepare()


def resolve_model(name_or_path: str) -> ModelTarget:
    """A built-in name, the embedded model's name, a config.json, a checkpoint dir or inline JSON."""
    from planner.commands import _model_text  # the planner CLI's own reading of --model
    from pqmesh.model.embedded import MODEL_NAME

    text = name_or_path.strip()
    if not text:
        raise InvalidArgument(
            "--model is empty; give a built-in name (e.g. opt-30b), a config.json or a checkpoint dir"
        )
    if not text.startswith("{") and not Path(text).exists() and canonical_name(text) == MODEL_NAME:
        text = str(_embedded_dir())
    if not text.startswith("{"):
        text = _model_text(text)
    if text.startswith("{"):
        shape = model_from_config_json(text)
        return ModelTarget(name_or_path, json.loads(text), shape)
    key = canonical_name(text)
    if key not in BUILTIN_CONFIGS:
        from planner.catalog import builtin_model

        builtin_model(text)  # raises NotFound listing the known names
    shape = model_from_config_json(json.dumps(BUILTIN_CONFIGS[key]), name=key)
    return ModelTarget(name_or_path, dict(BUILTIN_CONFIGS[key]), shape)


@dataclass(frozen=True)
class DeviceTarget:
    """`name` is stable across runs on one machine (CPU model and thread count, or GPU name)."""

    device: torch.device
    name: str
    memory_bytes: int

    @property
    def kind(self) -> str:
        return self.device.type

    def default_dtype(self) -> torch.dtype:
        """What a stage server runs by default: float32 on CPU, float16 on CUDA."""
        return torch.float32 if self.kind == "cpu" else torch.float16

    def default_profile_name(self) -> str:
        suffix = "cpu" if self.kind == "cpu" else f"cuda{self.device.index or 0}"
        return f"{socket.gethostname()}-{suffix}"

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)


def _cpu_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from pqmesh.cpuset import available_cpus, format_cpus

    # the cores this process may use: each pinned set (`--cpus`) is a device with its own measurements
    return f"cpu {model} x{torch.get_num_threads()} threads on cores {format_cpus(available_cpus())}"


def resolve_device(text: str) -> DeviceTarget:
    """"cpu" or "cuda[:N]"; anything else, or CUDA on a machine without it, is a clear error."""
    from pqmesh.capacity import physical_memory_bytes

    try:
        device = torch.device(text.strip())
    except RuntimeError:
        raise InvalidArgument(f"--device {text!r} is not a torch device; use cpu or cuda:N") from None
    if device.type == "cpu":
        return DeviceTarget(device, _cpu_name(), physical_memory_bytes())
    if device.type != "cuda":
        raise InvalidArgument(f"--device {text!r}: the profiler runs on cpu or cuda:N only")
    if not torch.cuda.is_available():
        raise FailedPrecondition(f"--device {text!r}: this machine has no usable CUDA device; use --device cpu")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise InvalidArgument(f"--device {text!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    props = torch.cuda.get_device_properties(index)
    return DeviceTarget(torch.device("cuda", index), props.name, int(props.total_memory))


def parse_dtype(name: str, device: DeviceTarget) -> torch.dtype:
    if not name:
        return device.default_dtype()
    if name not in DTYPES:
        raise InvalidArgument(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
