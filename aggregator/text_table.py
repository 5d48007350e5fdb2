"""Plain-text tables and error lists for terminal and cron-mail output, no rendering library."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aggregator.model import SiteError


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


def error_lines(errors: Iterable[SiteError], *, sites_shown: int = 3) -> list[str]:
    """One line per distinct (source, error), naming a few of its sites: a revoked account
    with 90 sites is one line in cron mail, not 90 copies of the same advice."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for error in errors:
        grouped.setdefault((error.source, error.error), []).append(error.site)
    lines = []
    for (source, message), sites in grouped.items():
        named = ", ".join(sites[:sites_shown])
        more = f" and {len(sites) - sites_shown} more" if len(sites) > sites_shown else ""
        lines.append(f"{source:<8} {named}{more}: {message}")
    return lines
