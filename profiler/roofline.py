"""The profile's roofline: datasheet figures for a known GPU, measured ones otherwise.

The planner uses the roofline for the embeddings, the LM head and any (bits, phase) without a fitted
model. For a GPU the planner's catalog knows (matched by name and memory size), its datasheet figures
and default efficiencies are used. For a CPU or an unknown GPU: a large matmul in the profile's dtype
(achieved TFLOP/s) and a large tensor copy (bytes read + written per second); both are achieved, not
peak, figures, so the efficiencies are set to 1.
"""

from __future__ import annotations

import re
import time

import torch

from planner.devices import BUILTIN_GPUS, MIB, Roofline, normalize_type
from profiler.target import DeviceTarget

MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
COPY_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def catalog_type(device_name: str, memory_bytes: int) -> str | None:
    """The catalog key for a GPU name ("NVIDIA A100-SXM4-80GB" -> "a100-80g"), or None."""
    key = normalize_type(device_name)
    if key in BUILTIN_GPUS:
        return key
    tokens = set(re.split(r"[-\s]+", key))
    matches = [k for k in BUILTIN_GPUS if k.split("-")[0] in tokens or k in key]
    if not matches:
        return None
    return min(matches, key=lambda k: abs(BUILTIN_GPUS[k][0] * MIB - memory_bytes))


def _best_seconds(run, sync, repeats: int = 5) -> float:
    run()
    sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def _matmul_tflops(device: DeviceTarget, dtype: torch.dtype) -> float:
    """Square matmuls from n = 256, doubled while one takes under 20 ms, up to the device's size
    (CPU half-precision GEMMs can be 100x slower than float32; a fixed size could take minutes)."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device.device).to(dtype)
        b = torch.randn(n, n, device=device.device).to(dtype)
        seconds = _best_seconds(lambda: torch.mm(a, b), device.synchronize, repeats=3)
        if n >= MATMUL_SIZE[device.kind] or seconds > 0.02:
            return 2 * n ** 3 / seconds / 1e12
        n *= 2


def measure(device: DeviceTarget, dtype: torch.dtype) -> tuple[float, float]:
    """(achieved TFLOP/s of a square matmul, achieved GB/s of a copy) on `device` in `dtype`."""
    tflops = _matmul_tflops(device, dtype)
    numel = COPY_BYTES[device.kind] // 4
    src = torch.ones(numel, device=device.device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device.synchronize)
    return tflops, 2 * src.nbytes / seconds / 1e9


def roofline_for(
    device: DeviceTarget, dtype: torch.dtype, measured: tuple[float, float] | None = None
) -> tuple[Roofline, str]:
    """(roofline, source): source is "catalog:<type>" or "measured"."""
    if device.kind == "cuda":
        key = catalog_type(device.name, device.memory_bytes)
        if key is not None:
            _, tflops, gbs = BUILTIN_GPUS[key]
            return Roofline(tflops, gbs), f"catalog:{key}"
    tflops, gbs = measured or measure(device, dtype)
    return Roofline(tflops, gbs, compute_efficiency=1.0, memory_efficiency=1.0), "measured"
