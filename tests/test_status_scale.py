"""`status` and its HTML report at portfolio scale: 10,000 sites with a realistic mix (see
tests/status_mix.py), checked against independent SQL; the report rendered by a real headless
Chromium with the network off."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from aggregator import migrations
from aggregator.dates import SOURCES, today_in
from aggregator.local_postgres import dsn_with_search_path
from aggregator.status import html, html_data
from aggregator.status.html_data import CELL_STATES
from tests.status_mix import expected_cells, expected_states, seed_mix
from tests.test_cli import aggregator

UTC_ZONE = ZoneInfo("UTC")
MAX_REPORT_BYTES = 5_000_000


def _seeded(server_dsn: str, n_sites: int) -> Iterator[str]:
    """A migrated schema holding the mix, seeded once per module (a few seconds at 10,000).
    Each step is its own event loop: the module outlives any one test's loop."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    dsn = dsn_with_search_path(server_dsn, schema)

    async def on(target: str, work) -> None:
        conn = await asyncpg.connect(target)
        try:
            await work(conn)
        finally:
            await conn.close()

    async def seed(conn: asyncpg.Connection) -> None:
        await migrations.apply_migrations(conn)
        await seed_mix(conn, n_sites, today_in(UTC_ZONE))

    asyncio.run(on(server_dsn, lambda conn: conn.execute(f"create schema {schema}")))
    try:
        asyncio.run(on(dsn, seed))
        yield dsn
    finally:
        asyncio.run(on(server_dsn, lambda conn: conn.execute(f"drop schema {schema} cascade")))


@pytest.fixture(scope="module")
def big(server_dsn: str) -> Iterator[str]:
    yield from _seeded(server_dsn, 10_000)


@pytest.fixture(scope="module")
def small(server_dsn: str) -> Iterator[str]:
    yield from _seeded(server_dsn, 600)


async def _independent(dsn: str, query) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        return await query(conn, today_in(UTC_ZONE))
    finally:
        await conn.close()


def test_summary_matches_independent_sql_and_fits_a_screen(big: str, tmp_path: Path) -> None:
    expected = asyncio.run(_independent(big, expected_states))
    result = aggregator("status", env={"DATABASE_URL": big}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 40, result.stdout
    assert lines[0].startswith(f"aggregator status {today_in(UTC_ZONE)} (UTC): ATTENTION")
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    for source in SOURCES:
        fresh, behind, failing, new = (int(n) for n in rows[source][2:6])
        assert {"fresh": fresh, "behind": behind, "failing": failing, "new": new} == (
            expected[source]
        )
    # The run figures: 30 runs, every 7th partial; API errors summed over the stats.
    assert "30 days: 25 of 30 runs ok (83.3%)" in result.stdout
    matomo_failed = sum(k % 3 for k in range(30))
    assert f"{100 * matomo_failed / 3000:.1f}% of 3000" in " ".join(rows["matomo"])
    # One line per cause: a thousand-site error repeated per site is one line.
    causes = re.findall(r"^  gsc\s+failing\s+(\d+)\s+(.+?)  ", result.stdout, re.MULTILINE)
    assert {cause for _, cause in causes} == {
        "team cannot access sc-domain:<site>",
        "invalid_grant: Token has been expired or revoked.",
    }
    assert sum(int(count) for count, _ in causes) == expected["gsc"]["failing"]
    assert (
        "  run     failing" not in result.stdout
    )  # failures of sites no longer monitored are not news


def test_all_lists_every_site_and_json_is_stable(big: str, tmp_path: Path) -> None:
    expected = asyncio.run(_independent(big, expected_states))
    total = sum(sum(states.values()) for states in expected.values())
    every = aggregator("status", "--all", env={"DATABASE_URL": big}, cwd=tmp_path)
    listed = [line for line in every.stdout.splitlines() if ".mix.example" in line.split(" ")[0]]
    assert len(listed) == total

    short = json.loads(
        aggregator("status", "--json", env={"DATABASE_URL": big}, cwd=tmp_path).stdout
    )
    full = json.loads(
        aggregator("status", "--json", "--all", env={"DATABASE_URL": big}, cwd=tmp_path).stdout
    )
    assert set(short) == {
        "schema", "today", "window_days", "ok", "stale", "sources", "runs", "run_errors", "attention",
        "sites",
    }  # fmt: skip
    assert set(short["sources"]["gsc"]) == {
        "due_day", "sites", "fresh", "behind", "failing", "new", "completion", "api",
    }  # fmt: skip
    assert set(short["sites"][0]) == {
        "site", "source", "account", "state", "last_day", "due_day", "expected_days",
        "missing_days", "provisional_until", "error",
    }  # fmt: skip
    for source in SOURCES:
        counts = {k: short["sources"][source][k] for k in ("fresh", "behind", "failing", "new")}
        assert counts == expected[source]
    attention = sum(expected[s]["behind"] + expected[s]["failing"] for s in SOURCES)
    assert len(short["sites"]) == attention and len(full["sites"]) == total
    assert sum(c["count"] for c in short["attention"]) == attention
    assert short["ok"] is False and short["stale"] is True


def test_html_report_at_10000_sites_stays_small(big: str, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    result = aggregator("status", "--html", str(report), env={"DATABASE_URL": big}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"report: {report}" in result.stderr
    assert report.stat().st_size < MAX_REPORT_BYTES
    page = report.read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is needed: `make test` installs Debian's package"
    return found


def dump_dom(page: Path) -> str:
    """The DOM after the page's scripts ran, in a real browser with every request refused."""
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--proxy-server=127.0.0.1:9",
            "--dump-dom",
            f"{page.as_uri()}#all",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def dom_cells(dom: str) -> dict[str, dict[str, int]]:
    names = {letter: name for letter, name in CELL_STATES.items()}
    counts: dict[str, dict[str, int]] = {}
    for source, cells in re.findall(r'<span class="c (\w+)">(.*?)</span>', dom):
        for letter in re.findall(r'<i class="(\w)"></i>', cells):
            mine = counts.setdefault(source, {})
            mine[names[letter]] = mine.get(names[letter], 0) + 1
    return counts


async def test_report_cells_in_a_real_browser_match_independent_sql(small: str, tmp_path) -> None:
    conn = await asyncpg.connect(small)
    try:
        data = await html_data.gather(conn, today_in(UTC_ZONE), UTC_ZONE, datetime.now(UTC))
        expected = await expected_cells(conn, today_in(UTC_ZONE))
    finally:
        await conn.close()
    page = tmp_path / "report.html"
    html.write(data, page)
    dom = await asyncio.to_thread(dump_dom, page)
    assert dom_cells(dom) == expected
    # Every state of the mix shows up, so the comparison is not vacuous.
    assert {"final", "provisional", "zero", "missing", "failed", "before deployment"} <= set(
        expected["gsc"]
    ) | set(expected["matomo"])
    assert "team-1@mix.example" in dom and "<svg" in dom
