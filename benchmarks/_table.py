"""The benchmarks' one table printer: a row per configuration, its measures and their ratios to a baseline
measured in the same run (``remat_sweep.py``, ``remat_compiled.py``).

Not a benchmark itself: running it does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]


def print_table(
    console: Any,
    title: str,
    configs: dict[str, Row],
    columns: Sequence[tuple[str, Callable[[Row], str]]],
    *,
    note: Callable[[Row], str],
    measured: Callable[[Row], bool],
    why: Callable[[Row], str],
    width: int,
    label: Callable[[str], str] = str,
) -> None:
    """Print one table: ``configuration`` and ``note`` left-aligned, the ``columns`` between them right-aligned.

    Args:
        console: a ``rich.console.Console``.
        title: the table's title (say what the ratios are against).
        configs: the configurations' results, in the order of the rows.
        columns: ``(header, cell)`` for each measure; ``cell`` formats one configuration's result.
        note: the last column's text for a measured configuration.
        measured: whether a configuration has the measures the cells read; a row that has not shows only
            ``why`` in its note, cut at ``width`` characters.
        why: the reason a configuration was not measured.
        width: the most characters of ``why`` shown.
        label: the configuration's name as the first column shows it.
    """
    from rich.table import Table

    table = Table(title=title)
    table.add_column("configuration", justify="left")
    for header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("note", justify="left")
    for cfg, r in configs.items():
        if not measured(r):
            table.add_row(label(cfg), *[""] * len(columns), why(r)[:width])
            continue
        table.add_row(label(cfg), *[cell(r) for _, cell in columns], note(r))
    console.print(table)
