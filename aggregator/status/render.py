"""`aggregator status` as text for the terminal and as the `--json` document (docs/status.md).

Pure functions of a `verdict.StatusReport`: the summary (verdict, one row per source, the run
figures), then one line per cause needing attention, every site with `--all`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

from aggregator.dates import SOURCES
from aggregator.status.verdict import STATES, RunSummary, StatusReport
from aggregator.text_table import table_lines

RUNS_SHOWN = 10
EXAMPLES_SHOWN = 3
CAUSES_SHOWN = 15
CAUSE_WIDTH = 100  # a cause longer than this is cut in the terminal (JSON and --all keep it)
JSON_SCHEMA_VERSION = 1


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value else None


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def _examples(sites: Sequence[str]) -> str:
    shown = ", ".join(sites[:EXAMPLES_SHOWN])
    return shown if len(sites) <= EXAMPLES_SHOWN else f"{shown}, …"


def _clip(text: str, width: int = CAUSE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _rate(present: int, expected: int) -> float | None:
    return present / expected if expected else None


def summary_lines(report: StatusReport, zone: ZoneInfo) -> list[str]:
    """The verdict, one row per source, the run figures."""
    attention = len(report.attention) + len(report.run_errors)
    verdict = "all fresh" if report.ok else f"ATTENTION: {attention} behind or failing"
    if not report.ok and report.fresh:
        verdict += " (every source's data is fresh)"
    figures = report.figures()
    rows = []
    for source in SOURCES:
        mine = report.of(source)
        if not mine:
            continue
        api = figures.api.get(source)
        api_text = "n/a" if api is None else f"{_percent(figures.error_rate(source))} of {api[0]}"
        rows.append(
            (
                source,
                str(len(mine)),
                *(str(report.count(source, state)) for state in STATES),
                report.due(source).isoformat(),
                _percent(_rate(*report.completion(source))),
                api_text,
            )
        )
    lines = [f"aggregator status {report.today} ({zone.key}): {verdict}"]
    if rows:
        header = ("source", "sites", *STATES, "due day", "completion", "API errors")
        lines += table_lines(header, rows)
    else:
        lines.append("no monitored site has Matomo or Search Console configured")
    last = report.last_run
    if last is None:
        lines.append(f"runs: none in the last {report.window_days} days")
    else:
        started = last.started_at.astimezone(zone).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"last run {started}: {last.status}, {_seconds(last.seconds)}, "
            f"{last.rows_upserted} rows, {last.errors} errors; {report.window_days} days: "
            f"{figures.ok} of {figures.runs} runs ok ({_percent(figures.completion_rate)}), "
            f"median {_seconds(figures.median_seconds)}"
        )
    return lines


def attention_lines(
    report: StatusReport, limit: int = CAUSES_SHOWN, *, every_site: bool = False
) -> list[str]:
    """What needs attention, one line per cause; pointing to `--all` unless it was given."""
    causes = report.causes()
    if not causes and not report.run_errors:
        return []
    pointer = "" if every_site else "; `aggregator status --all` lists every site"
    lines = ["", f"needs attention (one line per cause{pointer}):"]
    lines += [f"  run     failing: {' '.join(e.split())}" for e in report.run_errors[:limit]]
    rows = [
        (c.source, c.state, str(len(c.sites)), _clip(c.cause), f"e.g. {_examples(c.sites)}")
        for c in causes[: max(limit - len(report.run_errors), 0)]
    ]
    lines += [f"  {line}" for line in table_lines(("", "", "sites", "cause", ""), rows)[1:]]
    hidden = len(causes) - len(rows)
    if hidden > 0:
        lines.append(
            f"  … {hidden} more causes" + ("" if every_site else " (`aggregator status --all`)")
        )
    return lines


def site_lines(report: StatusReport) -> list[str]:
    """Every site source, for `--all`."""
    return [
        "",
        *table_lines(
            ("site", "source", "state", "last day", "due", "missing", "provisional to", "cause"),
            (
                (
                    s.site,
                    s.source,
                    s.state,
                    _iso(s.facts.last_day) or "-",
                    s.due.isoformat(),
                    f"{s.missing_days}/{s.expected_days}",
                    _iso(s.facts.provisional_until) or "-",
                    s.cause,
                )
                for s in sorted(report.sources, key=lambda s: (s.site, s.source))
            ),
        ),
    ]


def overview_lines(report: StatusReport, zone: ZoneInfo, *, every_site: bool = False) -> list[str]:
    """The summary and what needs attention: the terminal report (followed by every site with
    `--all`), and what the demo and the HTML report show."""
    return summary_lines(report, zone) + attention_lines(report, every_site=every_site)


def text(report: StatusReport, zone: ZoneInfo, *, every_site: bool = False) -> str:
    """The terminal report: the overview, then every site with `every_site`."""
    lines = overview_lines(report, zone, every_site=every_site)
    if every_site:
        lines += site_lines(report)
    return "\n".join(lines) + "\n"


def as_json(report: StatusReport, *, every_site: bool = False) -> dict[str, Any]:
    """The machine report (schema in docs/status.md): the same numbers as the text, with the
    sites needing attention (every site with `every_site`)."""
    figures = report.figures()

    def source_entry(source: str) -> dict[str, Any]:
        present, expected = report.completion(source)
        requests, failed = figures.api.get(source, (0, 0))
        return {
            "due_day": report.due(source).isoformat(),
            "sites": len(report.of(source)),
            **{state: report.count(source, state) for state in STATES},
            "completion": {
                "present": present,
                "expected": expected,
                "rate": _rate(present, expected),
            },
            "api": {
                "requests": requests,
                "failed_requests": failed,
                "error_rate": figures.error_rate(source),
            },
        }

    listed = report.sources if every_site else report.attention
    return {
        "schema": JSON_SCHEMA_VERSION,
        "today": report.today.isoformat(),
        "window_days": report.window_days,
        "ok": report.ok,
        "stale": not report.fresh,
        "sources": {source: source_entry(source) for source in SOURCES},
        "runs": {
            "count": figures.runs,
            "ok": figures.ok,
            "completion_rate": figures.completion_rate,
            "median_seconds": figures.median_seconds,
            "recent": [_run_entry(r) for r in report.runs[:RUNS_SHOWN]],
        },
        "run_errors": list(report.run_errors),
        "attention": [
            {
                "source": c.source,
                "state": c.state,
                "cause": c.cause,
                "count": len(c.sites),
                "sites": list(c.sites),
            }
            for c in report.causes()
        ],
        "sites": [
            {
                "site": s.site,
                "source": s.source,
                "account": s.facts.account,
                "state": s.state,
                "last_day": _iso(s.facts.last_day),
                "due_day": s.due.isoformat(),
                "expected_days": s.expected_days,
                "missing_days": s.missing_days,
                "provisional_until": _iso(s.facts.provisional_until),
                "error": s.error,
            }
            for s in sorted(listed, key=lambda s: (s.site, s.source))
        ],
    }


def _run_entry(run: RunSummary) -> dict[str, Any]:
    return {
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "status": run.status,
        "seconds": run.seconds,
        "rows_upserted": run.rows_upserted,
        "errors": run.errors,
        "first_error": run.first_error,
        "api": {s: {"requests": r, "failed_requests": f} for s, (r, f) in run.api.items()},
    }
