"""`pqmesh model prepare`: the embedded model as a safetensors checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="prepare and inspect model checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = model_sub.add_parser("prepare", help="convert an embedded GGUF model to a safetensors checkpoint")
    prepare.add_argument("--model", default="smollm2-135m-instruct",
                         help="smollm2-135m-instruct (default) or gemma-3-270m")
    prepare.add_argument("--out", type=Path, default=None, help="target directory (default: the pqmesh cache)")
    prepare.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prepare.set_defaults(func=_prepare, default_log_level="info")


def _prepare(args: argparse.Namespace) -> int:
    from pqmesh.model.embedded import prepare

    sys.stdout.write(f"{prepare(args.out, force=args.force, model=args.model)}\n")
    return 0
