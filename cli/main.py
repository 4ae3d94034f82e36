"""The `pqmesh` command: one subcommand per job, each defined in the module that does the work.

This is the top of the house: it dispatches to the ground (`pqmesh.model`, `pqmesh.quant`), the
services (`planner`, `coordinator`) and the applications (`profiler`, `localmesh`).

A subcommand module exposes ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed args, returns an exit code) and, for a long job whose per-step
progress users should see, ``default_log_level="info"``. Add new modules to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pqmesh import __version__
from pqmesh.errors import PqmeshError
from pqmesh.log import configure

COMMANDS = (
    "pqmesh.model.commands",  # model prepare
    "pqmesh.quant.commands",  # quantize, ppl, indicator
    "profiler.commands",  # profile, profile validate, profile link
    "planner.commands",  # plan
    "coordinator.commands",  # submit, status, results, ...
    "coordinator.mesh_commands",  # mesh replan
    "coordinator.lengths_command",  # lengths (a job file's histograms for `plan`)
    "localmesh.commands",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pqmesh", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pqmesh {__version__}")
    parser.add_argument("--log-level", default=None,
                        help="debug, info, warning or error (default: info for the long offline jobs "
                             "quantize, indicator, ppl and model prepare, which log one line per layer; "
                             "warning otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.log_level or getattr(args, "default_log_level", "warning"))
    try:
        return int(args.func(args) or 0)
    except PqmeshError as err:
        sys.stderr.write(f"pqmesh {args.command}: {err}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
