"""What `mixer` prints: one rich console sized for terminals and for logs, and a benchmark's table with its JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Logs and CI have no terminal width: give tables room rather than cutting paths.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="also write the result as JSON to this file ('-' for stdout)")


def report(
    title: str, columns: list[str] | tuple[str, ...], rows: list[list[str]], result: dict, target: str | None
) -> None:
    """A benchmark's table on the console (every column right-aligned), and its result as JSON where asked."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    write_json(result, target)


def write_json(result: dict, target: str | None) -> None:
    """`result` as JSON to the file `target`, to stdout for "-", nowhere for None."""
    if not target:
        return
    text = json.dumps(result, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text)
