"""Plain-text tables for terminal and cron-mail output, without a rendering dependency."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table_lines(
    header: Sequence[str], rows: Iterable[Sequence[object]], *, rule: bool = False
) -> list[str]:
    """Left-aligned columns; trailing blanks stripped so empty last cells vanish. With `rule`,
    a line of dashes separates the header from the rows."""
    lines = [tuple(str(cell) for cell in header), *(tuple(str(c) for c in row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    if rule:
        lines.insert(1, tuple("-" * width for width in widths))
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
