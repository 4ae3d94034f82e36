"""Prefill micro-batches grouped by length vs first come, first served, on prompts of spread lengths.

A prefill micro-batch is left-padded to its longest row. The coordinator's default
(`--prefill-length-window 8`) takes the oldest waiting prompt and, among the next 8 x micro-batch
waiting ones, those nearest its length; `--prefill-length-window 1` is FIFO. This bench runs the same
job both ways on the same stage process (interleaved, --repeat rounds, median reported) and prints
the measured job time, tokens/s, the padded prefill tokens each order computes (replayed by the real
scheduler) and whether the outputs match.

Workload: SmolLM2-135M (the embedded model, float32) in one `pqmesh-stage` process, prompts of
log-normal lengths (a chat-log-like spread, seeded), greedy, EOS ignored.

Run: .venv/bin/python bench/prefill_grouping.py [--prompts 48] [--new 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_throughput import run_job, start_stage  # noqa: E402

from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.main import serve  # noqa: E402
from coordinator.scheduler import Scheduler, Sequence  # noqa: E402
from pqmesh.length_groups import padded_tokens  # noqa: E402
from pqmesh.log import configure  # noqa: E402
from pqmesh.model.embedded import prepare  # noqa: E402
from pqmesh.plan import even_plan  # noqa: E402


def prompts_of_spread(count: int, seed: int, mu: float, sigma: float, longest: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [max(4, min(longest, int(rng.lognormvariate(mu, sigma)))) for _ in range(count)]
    return [[rng.randint(3, 40000) for _ in range(n)] for n in lengths]


def prefill_tokens(prompts, slots: int, prefill_mb: int, decode_mb: int, window: int, new: int) -> tuple[int, int]:
    """(real, padded) prompt tokens of every prefill, as the coordinator's scheduler forms them."""
    scheduler = Scheduler(slots, max(map(len, prompts)) + new, prefill_mb, decode_mb, 1, window)
    for i, row in enumerate(prompts):
        scheduler.add(Sequence("job", i, tuple(row), new))
    rows = []
    while scheduler.has_work():
        for batch in scheduler.schedule():
            if batch.phase.name == "PREFILL":
                rows.append(batch.lengths)
            scheduler.released(scheduler.update(batch.id, batch.slots, [7] * len(batch.slots)).release)
    return padded_tokens(rows)


def grouped_job(address: str, model_id: str, prompts, new: int, window: int, slots: int, prefill_mb: int,
                decode_mb: int) -> tuple[float, list]:
    """One job on a fresh coordinator whose scheduler uses prefill grouping ``window``."""
    with tempfile.TemporaryDirectory() as state:
        plan = even_plan(30, [address], prefill_mb, decode_mb)
        config = CoordinatorConfig("127.0.0.1:0", Path(state), plan, model_id, max_sequences=slots,
                                   max_tokens_per_sequence=max(map(len, prompts)) + new, log_level="warning",
                                   prefill_length_window=window)
        coordinator = serve(config)
        try:
            return run_job(coordinator.port, prompts, new)
        finally:
            coordinator.stop(grace=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--mu", type=float, default=3.5, help="log-normal length: mean of log tokens")
    parser.add_argument("--sigma", type=float, default=0.9, help="log-normal length: spread of log tokens")
    parser.add_argument("--longest", type=int, default=256)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--prefill-mb", type=int, default=8)
    parser.add_argument("--decode-mb", type=int, default=32)
    parser.add_argument("--window", type=int, default=8, help="the grouped run's --prefill-length-window")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the stage (default: all CPUs)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure("warning")
    model_dir = prepare()
    prompts = prompts_of_spread(args.prompts, 0, args.mu, args.sigma, args.longest)
    modes = {"fifo": 1, "grouped": args.window}
    times: dict[str, list[float]] = {m: [] for m in modes}
    outputs = {}
    load = [os.getloadavg()[0]]
    proc, address = start_stage(model_dir.parent, args.threads or None)
    try:
        grouped_job(address, model_dir.name, prompts[:4], 2, 1, args.slots, args.prefill_mb, args.decode_mb)  # warm-up
        for round_ in range(args.repeat):
            for mode in (list(modes) if round_ % 2 == 0 else list(modes)[::-1]):
                seconds, outputs[mode] = grouped_job(address, model_dir.name, prompts, args.new, modes[mode],
                                                     args.slots, args.prefill_mb, args.decode_mb)
                times[mode].append(seconds)
    finally:
        proc.terminate()
        proc.wait()
    load.append(os.getloadavg()[0])
    lengths = sorted(map(len, prompts))
    print(f"SmolLM2-135M fp32, one stage, {args.prompts} prompts of {lengths[0]}-{lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]}), {args.new} new tokens, {args.slots} KV slots, micro-batches "
          f"{args.prefill_mb} / {args.decode_mb}; {args.repeat} interleaved rounds")
    print("| prefill order | job s (median; runs) | tokens/s | prefill tokens computed / real |")
    print("|---|---|---|---|")
    for mode, window in modes.items():
        real, padded = prefill_tokens(prompts, args.slots, args.prefill_mb, args.decode_mb, window, args.new)
        median = statistics.median(times[mode])
        runs = ", ".join(f"{t:.2f}" for t in times[mode])
        print(f"| {mode} (window {window}) | {median:.2f} ({runs}) | {args.prompts * args.new / median:.1f} "
              f"| {padded} / {real} = {padded / real:.2f}x |")
    print(f"grouped / fifo job time: {statistics.median(times['grouped']) / statistics.median(times['fifo']):.2f}x")
    print(f"outputs identical: {outputs['fifo'] == outputs['grouped']}")
    print(f"1-minute load average: {load[0]:.2f} at the start, {load[1]:.2f} at the end")


if __name__ == "__main__":
    main()
