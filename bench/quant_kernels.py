"""CPU options for running one quantized linear, timed against fp32 ``F.linear`` in the same run.

    python bench/quant_kernels.py [--shapes 1536x576,576x1536] [--tokens 16,512]

Options: ours (`QuantLinear`: unpack + dequantize into a shared work buffer, then one fp32 GEMM) at
8/4/3/2 bits; eager optimum-quanto qint8/qint4/qint2 (fp32 activations, and qint4 with bf16, which
quanto routes to torch's tinygemm CPU kernel); torch's ``_weight_int4pack_mm_for_cpu`` and
``_weight_int8pack_mm`` called directly (bf16 activations; fp32 activations fall back to a slow
path). Rows are out x in features; tokens 16 is a decode micro-batch, 512 a prefill one.
Times are the best of 5 runs of 20 calls (this shared machine has other load; best-of filters it).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from pqmesh.log import configure
from pqmesh.quant.qlinear import QuantLinear


def best_ms(fn, calls: int = 20, runs: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def options(linear: torch.nn.Linear, x: torch.Tensor) -> dict:
    out_f, in_f = linear.weight.shape
    found = {"fp32 F.linear": lambda: F.linear(x, linear.weight)}
    for bits in (8, 4, 3, 2):
        q = QuantLinear.from_linear(linear, bits)
        found[f"ours {bits}-bit"] = lambda q=q: q(x)
    try:
        from optimum.quanto import freeze, qint2, qint4, qint8, quantize

        for name, qtype, dtype in (("qint8", qint8, torch.float32), ("qint4", qint4, torch.float32),
                                   ("qint2", qint2, torch.float32), ("qint4 bf16", qint4, torch.bfloat16)):
            module = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to(dtype)
            module[0].weight.data.copy_(linear.weight.to(dtype))
            quantize(module, weights=qtype)
            freeze(module)
            xd = x.to(dtype)
            found[f"quanto {name}"] = lambda m=module, xd=xd: m(xd)
    except ImportError:
        pass
    xb = x.to(torch.bfloat16)
    group = 128 if in_f % 128 == 0 else 64
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (out_f, in_f), dtype=torch.int32), 2)
    scale_zero = torch.rand(in_f // group, out_f, 2, dtype=torch.bfloat16)
    found[f"torch int4pack bf16 (g{group})"] = lambda: torch._weight_int4pack_mm_for_cpu(
        xb, packed, group, scale_zero
    ).float()
    q8, s8 = torch.randint(-128, 127, (out_f, in_f), dtype=torch.int8), torch.rand(out_f, dtype=torch.bfloat16)
    found["torch int8pack bf16 (per-channel)"] = lambda: torch._weight_int8pack_mm(xb, q8, s8).float()
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1536x576,576x1536", help="OUTxIN features, comma separated")
    parser.add_argument("--tokens", default="16,512")
    args = parser.parse_args(argv)
    configure("warning")
    out = sys.stdout
    out.write(
        f"# {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
    )
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        torch.nn.init.normal_(linear.weight, std=0.02)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, in_f)
            with torch.no_grad():  # quanto's qbits tensors refuse inference mode
                timings = {name: best_ms(fn) for name, fn in options(linear, x).items()}
            base = timings["fp32 F.linear"]
            out.write(f"\n{out_f}x{in_f}, {tokens} tokens\n")
            for name, ms in timings.items():
                out.write(f"  {name:34s} {ms:8.3f} ms  x{ms / base:5.2f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
