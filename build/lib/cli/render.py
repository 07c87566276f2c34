"""Small rendering helpers shared by the CLI modules: tables, --json output, sizes, progress bars.

Only cli/ imports this. Human output goes through rich; ``--json`` output is plain, stable JSON on
stdout (one document, sorted keys) so scripts can parse it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

__all__ = ["console", "err_console", "print_json", "print_table", "human_size", "progress_bar", "short"]


def console() -> Console:
    """A rich console on stdout (created per call so captured stdout is honoured).

    Piped output gets a wide fixed width so tables stay one row per line for grep and scripts.
    """
    return Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)


def err_console() -> Console:
    """A rich console on stderr: warnings and notices, never mixed into --json output."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Write ``data`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
    """A simple rich table. str cells are shown literally (markup escaped); pass rich Text for styling."""
    table = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else escape("" if cell is None else str(cell)) for cell in row))
    console().print(table)


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def short(text: str | None, width: int = 12) -> str:
    """A digest or recipient shortened for a table cell."""
    if not text:
        return ""
    return text if len(text) <= width else text[:width] + "…"


@contextlib.contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; yields ``callback(stage, done, total)`` for library progress hooks.

    Disabled (or when stderr is not a terminal) the callback does nothing.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda stage, done, total: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), console=err_console(), transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def callback(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{description}: {stage}", total=total or 1)
            bar.update(tasks[stage], completed=done, total=total or 1)

        yield callback


def help_with_guard_status(command: click.Command, screened_note: str) -> None:
    """Append the guard's real status to ``command``'s --help (computed when help is shown, not at import).

    ``screened_note`` is what to say when the real guard is installed; a pass-through guard is said plainly.
    """
    original = command.get_help

    def get_help(ctx: click.Context) -> str:
        from runtime.loader import guard_is_passthrough

        note = ("NOTE: the guard is a pass-through (runtime.guard.default_guard is not installed): nothing is screened."
                if guard_is_passthrough() else screened_note)
        return original(ctx) + "\n\n" + note

    command.get_help = get_help  # type: ignore[method-assign]
