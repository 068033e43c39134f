"""`mixer bench`: the benchmarks, one module per subcommand, each registering its own parser (`add_command`).

Every benchmark prints a table and, with `--json`, writes its result for docs/BENCHMARKS.md. Those that compare
against a baseline measure it in the same command: the machines are noisy.
"""

from __future__ import annotations

import argparse
import importlib

# Subcommand -> module, in the order `mixer bench --help` lists them.
COMMANDS = ("train", "data", "checkpoint", "remat", "scale", "allreduce")


def add_commands(parser: argparse.ArgumentParser) -> None:
    """`mixer bench COMMAND`: each benchmark module adds its own subcommand."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.bench.{name}").add_command(sub)


def add_model_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--model`: one of the paper's named variants (models.mixer.VARIANTS)."""
    from pipeline.models.mixer import VARIANTS

    parser.add_argument("--model", default=default, choices=list(VARIANTS), help=f"Mixer variant (default {default})")
