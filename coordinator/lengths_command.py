"""`pqmesh lengths JOB.jsonl`: a job file's prompt and generation lengths as `pqmesh plan` flags.

    pqmesh lengths JOB.jsonl [--tokenizer DIR] [--max-new-tokens N] [--bin 16] [--json]

Reads every line as the coordinator reads an uploaded job (OpenAI Batch lines or plain
``{"prompt": ...}`` / ``{"token_ids": [...]}`` lines; chat messages through the tokenizer's chat
template), counts each request's prompt tokens and its max_new_tokens (its own ``max_tokens``, else
``--max-new-tokens``), rounds both up to multiples of ``--bin`` and prints::

    --prompt-lengths 32:810,64:170,... --gen-lengths 64:1000

so that ``pqmesh plan ... $(pqmesh lengths job.jsonl --tokenizer DIR)`` plans for that job. Lines
the coordinator would answer with an error (bad JSON, text without a tokenizer) are counted and
reported on stderr, not planned for. ``--json`` prints the histograms and counts as one object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import structlog

from coordinator.openai_batch import parse_line
from coordinator.requests import RequestError
from coordinator.resolve import Resolver
from coordinator.settings import GenerationSettings
from coordinator.store import ResultRecord
from coordinator.text import TextCodec
from pqmesh.errors import InvalidArgument, NotFound
from pqmesh.lengths import LengthHistogram

log = structlog.get_logger(__name__)
NO_LIMIT = 1 << 30  # count lengths as they are; whether they fit is the planner's question
PROGRESS_EVERY = 20000
CHUNK_LINES = 1000  # lines tokenized in one batch (PROGRESS_EVERY is a multiple)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lengths", help="a job file's prompt / generation lengths as `pqmesh plan` histogram flags")
    p.add_argument("job", type=Path, help="jsonl job file (OpenAI Batch or plain lines), as for `pqmesh submit`")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (needed for text prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="max_new_tokens of requests that set none (default 64, as `pqmesh submit`)")
    p.add_argument("--bin", type=int, default=16, help="round lengths up to multiples of this (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the flags")
    p.set_defaults(func=run)


def job_file_lengths(path: Path, codec: TextCodec | None, max_new_tokens: int,
                     bin_size: int) -> tuple[LengthHistogram, LengthHistogram, Counter]:
    """(prompt histogram, generation histogram, refused lines by error code) of a job file."""
    if not path.is_file():
        raise NotFound(f"job file {path} does not exist")
    if bin_size < 1 or max_new_tokens < 1:
        raise InvalidArgument("--bin and --max-new-tokens must be >= 1")
    resolver = Resolver(NO_LIMIT, codec)
    settings = GenerationSettings(max_new_tokens, False, 0.0, 0, 1.0, 0)
    prompts: Counter[int] = Counter()
    generations: Counter[int] = Counter()
    refused: Counter[str] = Counter()
    with path.open(encoding="utf-8") as lines:
        for number, chunk in enumerate(_chunks(lines, resolver), 1):
            for resolved in resolver.resolve_many(chunk, settings):
                if isinstance(resolved, ResultRecord):
                    refused[resolved.error_code] += 1
                    continue
                prompts[_binned(len(resolved.prompt), bin_size)] += 1
                generations[_binned(resolved.max_new_tokens, bin_size)] += 1
            if number * CHUNK_LINES % PROGRESS_EVERY == 0:
                log.info("lengths_progress", lines=chunk[-1][0] + 1)
    if not prompts:
        raise InvalidArgument(f"{path}: no line holds a request that can be planned for (refused: {dict(refused)})"
                              + ("; text prompts need --tokenizer DIR" if codec is None else ""))
    return LengthHistogram.of(prompts.items()), LengthHistogram.of(generations.items()), refused


def _chunks(lines, resolver: Resolver):
    """The file's non-blank lines as lists of up to CHUNK_LINES (index, request or error result), parsed as
    the coordinator parses them (any model name: the lengths are the question)."""
    chunk = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            chunk.append((index, replace(parse_line(line), model="")))
        except RequestError as err:
            chunk.append((index, resolver.error(index, err)))
        if len(chunk) == CHUNK_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _binned(length: int, bin_size: int) -> int:
    return bin_size * math.ceil(max(1, length) / bin_size)


def run(args: argparse.Namespace) -> int:
    codec = TextCodec(args.tokenizer) if args.tokenizer is not None else None
    prompts, generations, refused = job_file_lengths(args.job, codec, args.max_new_tokens, args.bin)
    if refused:
        sys.stderr.write(f"pqmesh lengths: {sum(refused.values())} lines left out, as the coordinator would answer "
                         f"them with an error: {dict(refused)}\n")
    if args.json:
        sys.stdout.write(json.dumps({"requests": prompts.total, "refused": dict(refused),
                                     "prompt_lengths": str(prompts), "gen_lengths": str(generations),
                                     "prompt_mean": round(prompts.mean, 1), "prompt_longest": prompts.longest,
                                     "gen_mean": round(generations.mean, 1), "gen_longest": generations.longest})
                         + "\n")
    else:
        sys.stdout.write(f"--prompt-lengths {prompts} --gen-lengths {generations}\n")
    return 0
