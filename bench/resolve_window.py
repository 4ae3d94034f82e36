"""Tokenizing a feeder window: stored text prompts resolved one call each vs in one batch.

The coordinator's engine thread resolves every stored prompt it reads (`coordinator.feeder.Feeder.top_up`,
up to half its window at a time, and `coordinator.job_lengths.pending_lengths` at job load): the time
it spends there is time no micro-batch is sent. This resolves --rows WikiText-2 lines (at least
--min-chars each) as text `Prompt`s, alternating one `Resolver.stored` call per row (the old path) with
one `Resolver.stored_many` call for the window, --repeats times, and prints min/median/max of each and
the ratio of the medians. The tokenizer batches in Rust on its own threads, so the ratio grows with cores.
Run: .venv/bin/python bench/resolve_window.py [--model DIR] [--rows 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from coordinator.resolve import Resolver
from coordinator.settings import GenerationSettings
from coordinator.store import PendingPrompt
from coordinator.text import TextCodec
from pqmesh.api.coordinator.v1 import coordinator_pb2

DEFAULT_MODEL = Path.home() / ".cache/pqmesh/models/smollm2-135m-instruct"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/test.txt"


def window(text: Path, rows: int, min_chars: int) -> list[PendingPrompt]:
    lines = [line for line in text.read_text().split("\n") if len(line) >= min_chars][:rows]
    return [PendingPrompt(i, None, coordinator_pb2.Prompt(text=line).SerializeToString())
            for i, line in enumerate(lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a directory with tokenizer.json")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--rows", type=int, default=1024, help="prompts per window (the feeder reads <= 1024)")
    parser.add_argument("--min-chars", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    resolver, settings = Resolver(1 << 20, TextCodec(args.model)), GenerationSettings(16)
    rows = window(args.text, args.rows, args.min_chars)
    single, batch = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        alone = [resolver.stored(row, settings) for row in rows]
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        together = resolver.stored_many(rows, settings)
        batch.append(time.perf_counter() - start)
        assert [r.prompt for r in alone] == [r.prompt for r in together]
    tokens = sum(len(r.prompt) for r in together)
    print(f"{len(rows)} text prompts, {tokens} tokens, {os.cpu_count()} cores, {args.repeats} interleaved repeats")
    for name, times in (("one call per row", single), ("one batch", batch)):
        print(f"  {name:17s} min {min(times) * 1e3:7.1f} ms  median {statistics.median(times) * 1e3:7.1f} ms  "
              f"max {max(times) * 1e3:7.1f} ms")
    print(f"ratio (median one-per-row / median batch): {statistics.median(single) / statistics.median(batch):.2f}x")


if __name__ == "__main__":
    main()
