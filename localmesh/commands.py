"""`pqmesh demo`: the whole mesh on loopback, or the model's slices in this process; `pqmesh run-batch`:
a jsonl file end to end, on a local mesh or against a coordinator (`localmesh.run_batch`).

`pqmesh demo` runs the whole mesh on loopback (`localmesh.demo`). `pqmesh demo --in-process`
runs a few chat prompts through the model split into slices in this process and through Hugging Face
`generate` on the same prompts, and prints both texts and their tokens per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from localmesh import DEFAULT_BUDGETS_MB

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain pipeline parallelism in one sentence.",
    "List three uses of a hash table.",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="planner + pinned stage servers (one per core set) + coordinator on "
                                       "loopback, plan vs PipeEdge baseline")
    demo.add_argument("--prompts", type=int, default=64, help="prompts in the batch (default: 64)")
    demo.add_argument(
        "--max-new-tokens", type=int, default=None, help="new tokens per prompt (default: 32; 40 in-process)"
    )
    demo.add_argument("--budgets-mb", default=",".join(map(str, DEFAULT_BUDGETS_MB)),
                      help="memory budget of each stage server in MiB, one stage per budget, each on its own cores "
                           "(default: %(default)s)")
    demo.add_argument("--quick-profile", action="store_true", help="profile on a small grid (faster, less accurate)")
    demo.add_argument("--workdir", type=Path, default=None, help="logs, plans and databases (default: a new temp dir)")
    demo.add_argument("--in-process", action="store_true",
                      help="instead: chained slices in this process vs Hugging Face generate (token-exact check)")
    demo.add_argument("--model", type=Path, default=None, help="--in-process: checkpoint directory (default: embedded)")
    demo.add_argument("--stages", type=int, default=2, help="--in-process: number of slices (default: 2)")
    demo.add_argument("--device", default="cpu", help="--in-process: cpu or cuda[:N]")
    demo.set_defaults(func=_demo)

    batch = sub.add_parser("run-batch", help="run a jsonl batch file (OpenAI Batch or plain lines) end to end: on a "
                                             "local mesh, or against --coordinator")
    batch.add_argument("-i", "--input", type=Path, required=True, help="input jsonl")
    batch.add_argument("-o", "--output", type=Path, required=True, help="output jsonl (OpenAI Batch output lines for "
                                                                        "an OpenAI input)")
    batch.add_argument("--coordinator", action="append", default=None, metavar="HOST:PORT",
                       help="a running coordinator (repeat it to shard the file across several, one mesh "
                            "each); default: start a local mesh, run, stop it")
    batch.add_argument("--model", type=Path, default=None, help="local mesh: checkpoint directory (default: embedded "
                                                                "SmolLM2-135M-Instruct)")
    batch.add_argument("--budgets-mb", default="2000", help="local mesh: memory budget of each stage server in MiB, "
                                                            "comma-separated (default: one stage of 2000)")
    batch.add_argument("--max-sequences", type=int, default=32, help="local mesh: KV-cache slots (default 32)")
    batch.add_argument("--quick-profile", action="store_true", help="local mesh: profile on a small grid")
    batch.add_argument("--workdir", type=Path, default=None, help="local mesh: logs, plan, databases")
    batch.add_argument("--max-new-tokens", type=int, default=64,
                       help="tokens per request without its own max_tokens (default 64)")
    batch.add_argument("--ignore-eos", action="store_true", help="plain lines: always generate --max-new-tokens")
    batch.add_argument("--temperature", type=float, default=0.0, help="default for requests without one (0 = greedy)")
    batch.add_argument("--top-k", type=int, default=0)
    batch.add_argument("--top-p", type=float, default=0.0)
    batch.add_argument("--seed", type=int, default=0)
    batch.add_argument("--idempotency-key", default=None,
                       help="default: a hash of the file and settings, so a re-run finds (and resumes) the same job")
    batch.set_defaults(func=_run_batch)


def even_cuts(layers: int, stages: int) -> list[int]:
    """Boundaries of ``stages`` contiguous slices whose sizes differ by at most one layer."""
    if not 1 <= stages <= layers:
        raise ValueError(f"stages must be within 1..{layers}, got {stages}")
    return [round(i * layers / stages) for i in range(stages + 1)]


def _demo(args: argparse.Namespace) -> int:
    if args.in_process:
        args.max_new_tokens = args.max_new_tokens or 40
        return _demo_in_process(args)
    from localmesh.demo import DemoOptions, run_demo

    try:
        budgets = tuple(int(x) for x in args.budgets_mb.split(","))
    except ValueError:
        sys.stderr.write(f"--budgets-mb takes comma-separated integers (MiB), got {args.budgets_mb!r}\n")
        return 2
    if args.prompts < 1 or len(budgets) < 1:
        sys.stderr.write("--prompts must be >= 1 and --budgets-mb must name at least one stage\n")
        return 2
    options = DemoOptions(prompts=args.prompts, max_new_tokens=args.max_new_tokens or 32, budgets_mb=budgets,
                          quick_profile=args.quick_profile, workdir=args.workdir)
    try:
        run_demo(options)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; every server was stopped\n")
        return 130
    return 0


def _demo_in_process(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pqmesh.model import LocalPipeline, ModelShard
    from pqmesh.model.embedded import prepare
    from pqmesh.model.loading import load_config

    out = sys.stdout
    model_dir = args.model or prepare()
    config = load_config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in DEMO_PROMPTS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    cuts = even_cuts(config.num_hidden_layers, args.stages)
    budget = max(len(p) for p in prompts) + args.max_new_tokens
    out.write(f"model {model_dir.name}: {config.model_type}, {config.num_hidden_layers} layers, "
              f"slices {[(a, b) for a, b in zip(cuts, cuts[1:])]} on {args.device}\n")
    shards = [
        ModelShard.load(model_dir, a, b, max_slots=len(prompts), max_len=budget, device=args.device)
        for a, b in zip(cuts, cuts[1:])
    ]
    pipeline = LocalPipeline(shards)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pipeline.generate_greedy(prompts, 2, len(prompts), len(prompts))  # warm-up, like the reference below
    start = time.perf_counter()
    ours = pipeline.generate_greedy(prompts, args.max_new_tokens, len(prompts), len(prompts), stop_ids=eos)
    ours_s = time.perf_counter() - start

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(args.device)
    with torch.no_grad():
        reference.generate(**batch, max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    with torch.no_grad():
        generated = reference.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    hf_s = time.perf_counter() - start
    theirs = [_until_stop(row[batch["input_ids"].shape[1]:].tolist(), eos) for row in generated]

    same = 0
    for prompt, mine, ref in zip(DEMO_PROMPTS, ours, theirs):
        same += mine == ref
        out.write(f"\n> {prompt}\n  pqmesh: {tokenizer.decode(mine, skip_special_tokens=True).strip()}\n")
        if mine != ref:
            out.write(f"  HF    : {tokenizer.decode(ref, skip_special_tokens=True).strip()}\n")
    ours_n, hf_n = sum(map(len, ours)), sum(map(len, theirs))
    out.write(f"\n{same}/{len(prompts)} outputs identical to Hugging Face generate\n")
    out.write(f"pqmesh ({args.stages} slices): {ours_n} tokens in {ours_s:.2f} s = {ours_n / ours_s:.1f} tokens/s\n")
    out.write(f"HF generate            : {hf_n} tokens in {hf_s:.2f} s = {hf_n / hf_s:.1f} tokens/s\n")
    return 0


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def _run_batch(args: argparse.Namespace) -> int:
    from coordinator.batch_client import BatchFailed
    from localmesh.run_batch import RunBatchOptions, run
    from pqmesh.api.common.v1 import tensor_pb2
    from pqmesh.api.coordinator.v1 import coordinator_pb2

    try:
        budgets = tuple(int(x) for x in args.budgets_mb.split(","))
    except ValueError:
        sys.stderr.write(f"--budgets-mb takes comma-separated integers (MiB), got {args.budgets_mb!r}\n")
        return 2
    params = coordinator_pb2.GenerationParams(
        max_new_tokens=args.max_new_tokens, stop_on_eos=not args.ignore_eos,
        sampling=tensor_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                           seed=args.seed))
    options = RunBatchOptions(args.input, args.output, params, tuple(args.coordinator or ()), args.model,
                              budgets, args.max_sequences, args.quick_profile, args.workdir, args.idempotency_key)
    try:
        final = run(options)
    except BatchFailed as err:
        sys.stderr.write(f"pqmesh run-batch: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; every server was stopped\n")
        return 130
    if final.state != coordinator_pb2.JOB_STATE_SUCCEEDED:
        sys.stderr.write(f"job {final.job_id} ended {coordinator_pb2.JobState.Name(final.state)}: {final.message}\n")
        return 1
    return 0
