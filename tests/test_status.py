"""`aggregator status`: freshness rules as pure functions, the SQL on real Postgres, the CLI as
cron and monitors run it (exit 0 fresh, 1 behind or failing, 2 unusable)."""

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from aggregator import storage
from aggregator.dates import due_day, today_in
from aggregator.model import SiteError
from aggregator.status import queries, render
from aggregator.status.verdict import RunSummary, SourceFacts, SourceStatus, build_report
from tests.factories import add_account, add_site
from tests.test_cli import aggregator, one_line_error

TODAY = date(2024, 5, 10)
LONG_AGO = date(2020, 1, 1)
UTC_ZONE = ZoneInfo("UTC")


def facts(source: str, last: date | None, present: int = 0, deployed=LONG_AGO, **kw):
    return SourceFacts("example.com", source, deployed, last, present, **kw)


def one(fact: SourceFacts, error: str | None = None) -> SourceStatus:
    errors = {(fact.site, fact.source): error} if error else {}
    return build_report(TODAY, [fact], [], errors).sources[0]


def test_due_days_matomo_yesterday_search_console_four_days_before() -> None:
    assert due_day("matomo", TODAY) == date(2024, 5, 9)
    assert due_day("gsc", TODAY) == date(2024, 5, 5)


def test_a_source_is_fresh_when_its_numbers_reach_the_due_day() -> None:
    assert one(facts("matomo", date(2024, 5, 9))).state == "fresh"
    assert one(facts("matomo", date(2024, 5, 8))).state == "behind"
    assert one(facts("gsc", date(2024, 5, 5))).state == "fresh"
    assert one(facts("gsc", date(2024, 5, 4))).state == "behind"
    assert one(facts("gsc", None)).state == "behind"


def test_the_last_runs_error_makes_a_source_failing_even_with_recent_numbers() -> None:
    failing = one(facts("matomo", date(2024, 5, 9)), "HTTP 500 from Matomo")
    assert failing.state == "failing" and failing.needs_attention


def test_a_site_deployed_after_the_due_day_is_new_not_behind() -> None:
    new = one(facts("gsc", None, deployed=date(2024, 5, 7)))
    assert new.state == "new" and new.expected_days == 0 and not new.needs_attention
    # ...while Matomo, due yesterday, already expects the deployment day onwards.
    assert one(facts("matomo", None, deployed=date(2024, 5, 7))).expected_days == 3


def test_completion_counts_the_30_days_ending_yesterday_up_to_each_due_day() -> None:
    report = build_report(
        TODAY, [facts("matomo", date(2024, 5, 9), 30), facts("gsc", date(2024, 5, 5), 20)], []
    )
    assert report.completion("matomo") == (30, 30)
    assert report.completion("gsc") == (20, 26)  # 10 April to the due day, 5 May
    assert report.completion() == (50, 56)
    payload = render.as_json(report)
    assert payload["sources"]["matomo"]["completion"]["rate"] == 1.0
    assert payload["sources"]["gsc"]["completion"]["expected"] == 26


def test_causes_group_the_same_error_across_sites() -> None:
    def failing(site: str) -> SourceFacts:
        return SourceFacts(site, "gsc", LONG_AGO, date(2024, 5, 8), 30)

    sites = [f"s{n}.com" for n in range(5)]
    errors = {(s, "gsc"): f"account a@x cannot access sc-domain:{s}" for s in sites}
    report = build_report(TODAY, [failing(s) for s in sites], [], errors)
    (cause,) = report.causes()
    assert cause.cause == "account a@x cannot access sc-domain:<site>"
    assert cause.sites == tuple(sites)
    text = render.text(report, UTC_ZONE)
    assert "gsc  failing  5      account a@x cannot access sc-domain:<site>" in text
    assert "e.g. s0.com, s1.com, s2.com, …" in text
    assert (
        "needs attention (one line per cause; `aggregator status --all` lists every site):" in text
    )
    # With --all every site follows: no pointer to the option already given.
    every = render.text(report, UTC_ZONE, every_site=True)
    assert "needs attention (one line per cause):" in every and "--all" not in every


def test_an_error_naming_no_monitored_site_is_reported_as_a_run_failure() -> None:
    report = build_report(TODAY, [], [], {("(run)", "pipeline"): "run lock lost"})
    assert not report.ok and report.fresh  # listed, but nothing is stale
    assert "run     failing: pipeline (run): run lock lost" in render.text(report, UTC_ZONE)


def test_run_figures_median_completion_and_api_error_rate() -> None:
    start = datetime(2024, 5, 9, 2, tzinfo=UTC)

    def run(day: int, seconds: int, state: str, api: dict) -> RunSummary:
        began = start - timedelta(days=day)
        return RunSummary(began, began + timedelta(seconds=seconds), state, 10, 0, None, api)

    runs = [
        run(0, 100, "partial", {"matomo": (10, 1), "gsc": (100, 3)}),
        run(1, 300, "ok", {"matomo": (10, 0), "gsc": (100, 1)}),
        run(2, 200, "ok", {}),  # before stats were recorded: not counted as zero errors
    ]
    figures = build_report(TODAY, [], runs).figures()
    assert figures.median_seconds == 200
    assert figures.runs == 3 and figures.ok == 2
    assert figures.error_rate("matomo") == 1 / 20
    assert figures.error_rate("gsc") == 4 / 200
    assert build_report(TODAY, [], runs[2:]).figures().error_rate("gsc") is None


def test_api_counts_ignore_malformed_stats() -> None:
    assert queries.api_counts(None) == {}
    assert queries.api_counts("not json") == {}
    good = {"requests": 4, "failed_requests": 1, "retries": 2}
    stats = {"matomo": good, "gsc": {"requests": "4", "failed_requests": 1}, "x": 3}
    assert queries.api_counts(json.dumps(stats)) == {"matomo": (4, 1)}
    assert queries.api_counts({"gsc": {"requests": True, "failed_requests": 0}}) == {}


async def test_load_facts_reads_configured_sources_of_monitored_sites(conn) -> None:
    account = await add_account(conn, "a@example.com", "tok")
    both = await add_site(conn, "both.com", matomo_site_id=1, gsc_account_id=account)
    await add_site(conn, "matomo-only.com", matomo_site_id=2)
    await add_site(conn, "retired.com", matomo_site_id=3, active=False)
    await add_site(conn, "undeployed.com", matomo_site_id=4, deployed=False)
    await deploy_all(conn, date(2024, 1, 1))
    await conn.execute("update sites set deployed_at = null where domain = 'undeployed.com'")
    await storage.upsert_daily_rows(
        conn,
        [
            storage.DailyRow(both, date(2024, 5, 8), matomo=(5, 9), gsc=(1, 10, 0.1, 3.0, False)),
            storage.DailyRow(both, date(2024, 5, 4), gsc=(2, 20, 0.1, 4.0, True)),
            storage.DailyRow(both, date(2024, 3, 1), matomo=(1, 1)),  # before the window
        ],
    )
    found = {(f.site, f.source): f for f in await queries.load_facts(conn, TODAY, UTC_ZONE)}
    assert set(found) == {
        ("both.com", "matomo"),
        ("both.com", "gsc"),
        ("matomo-only.com", "matomo"),
    }
    assert found["both.com", "matomo"].last_day == date(2024, 5, 8)
    assert found["both.com", "matomo"].present_days == 1
    # Provisional numbers count: the newest GSC day is the provisional one.
    assert found["both.com", "gsc"].last_day == date(2024, 5, 8)
    assert found["both.com", "gsc"].provisional_until == date(2024, 5, 8)
    assert found["both.com", "gsc"].present_days == 1  # the window ends at the due day, 5 May
    assert found["both.com", "gsc"].account == "a@example.com"
    assert found["matomo-only.com", "matomo"].last_day is None
    assert found["both.com", "matomo"].deployed_on == date(2024, 1, 1)


async def test_load_runs_reads_stats_only_where_the_column_exists(conn) -> None:
    since = datetime.now(UTC) - timedelta(days=1)
    await seed_run(conn, [])
    (run,) = await queries.load_runs(conn, since)
    assert run.api == {}
    await conn.execute("alter table aggregator_runs add column if not exists stats jsonb")
    await conn.execute(
        """update aggregator_runs set stats = '{"gsc": {"requests": 8, "failed_requests": 2}}'"""
    )
    (run,) = await queries.load_runs(conn, since)
    assert run.api == {"gsc": (8, 2)}


async def deploy_all(conn, day: date) -> None:
    await conn.execute(
        "update sites set deployed_at = $1", datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    )


async def seed_run(conn, errors: list[SiteError]) -> None:
    today = today_in(UTC_ZONE)
    run_id = await storage.start_run(conn, today, today, 1)
    await storage.finish_run(conn, run_id, status="partial", rows_upserted=7, errors=errors)


async def test_cli_exits_1_only_when_something_is_stale(db, conn, tmp_path) -> None:
    """The contract: exit 1 if anything is stale. A source the last run failed whose numbers
    still reach the due day is listed as failing (it needs attention), yet exits 0; one whose
    numbers have aged too is stale, and so is a source behind."""
    yesterday = today_in(UTC_ZONE) - timedelta(days=1)
    site = await add_site(conn, "fresh.com", matomo_site_id=1)
    await deploy_all(conn, yesterday)
    await storage.upsert_daily_rows(conn, [storage.DailyRow(site, yesterday, matomo=(3, 4))])
    await seed_run(conn, [])
    env = {"DATABASE_URL": db}

    fresh = aggregator("status", env=env, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "all fresh" in fresh.stdout.splitlines()[0]
    assert "API errors" in fresh.stdout and "n/a" in fresh.stdout  # no stats column yet

    await seed_run(conn, [SiteError("fresh.com", "matomo", "HTTP 500 from Matomo")])
    failing = aggregator("status", env=env, cwd=tmp_path)
    assert failing.returncode == 0, failing.stderr
    assert "ATTENTION: 1 behind or failing (every source's data is fresh)" in failing.stdout
    assert "failing  1      HTTP 500 from Matomo" in failing.stdout
    as_json = json.loads(aggregator("status", "--json", env=env, cwd=tmp_path).stdout)
    assert as_json["ok"] is False and as_json["stale"] is False

    await conn.execute("delete from daily_analytics where date = $1", yesterday)
    aged = aggregator("status", "--json", env=env, cwd=tmp_path)
    assert aged.returncode == 1, aged.stderr
    assert json.loads(aged.stdout)["stale"] is True
    assert "HTTP 500 from Matomo" in aged.stdout
    await storage.upsert_daily_rows(conn, [storage.DailyRow(site, yesterday, matomo=(3, 4))])

    await seed_run(conn, [])
    await add_site(conn, "behind.com", matomo_site_id=2)  # nothing stored
    await deploy_all(conn, yesterday)
    behind = aggregator("status", env=env, cwd=tmp_path)
    assert behind.returncode == 1, behind.stderr
    assert "matomo  behind  1      nothing stored yet  e.g. behind.com" in behind.stdout


async def test_cli_json_closed_pipe_ends_quietly(db, conn, tmp_path) -> None:
    for n in range(300):
        await add_site(conn, f"s{n}.com", matomo_site_id=n)
    await deploy_all(conn, today_in(UTC_ZONE) - timedelta(days=10))
    env = {"DATABASE_URL": db}
    base = aggregator("status", "--json", "--all", env=env, cwd=tmp_path)
    assert len(base.stdout) > 65536  # more than a pipe holds: the writer must meet the closed end
    reader = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m aggregator status --json --all | head -c 10",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(reader.communicate(), 60)
    assert out.decode() == base.stdout[:10]
    assert err.decode() == ""  # no BrokenPipeError traceback


async def test_cli_with_stdout_closed_exits_with_its_verdict(db, conn, tmp_path) -> None:
    """`aggregator status >&-`: nobody can read the report, so the exit status is the whole
    answer: 0 fresh, 1 stale, as with a readable stdout; not 141, nothing on stderr."""
    yesterday = today_in(UTC_ZONE) - timedelta(days=1)
    site = await add_site(conn, "fresh.com", matomo_site_id=1)
    await deploy_all(conn, yesterday)

    def closed(*args: str) -> subprocess.CompletedProcess[str]:
        return aggregator(
            "status", *args, env={"DATABASE_URL": db}, cwd=tmp_path, stdout_closed=True
        )

    for args in ((), ("--json",), ("--all",)):
        stale = closed(*args)
        assert (stale.returncode, stale.stderr) == (1, ""), args
    await storage.upsert_daily_rows(conn, [storage.DailyRow(site, yesterday, matomo=(3, 4))])
    for args in ((), ("--json",)):
        fresh = closed(*args)
        assert (fresh.returncode, fresh.stderr) == (0, ""), args
    html = closed("--html", str(tmp_path / "report.html"))
    assert html.returncode == 0 and html.stderr.startswith("report: "), html.stderr
    assert (tmp_path / "report.html").stat().st_size > 0


async def test_cli_json_to_a_full_disk_fails_in_one_line(db, conn, tmp_path) -> None:
    await add_site(conn, "full.com", matomo_site_id=1)
    dev_full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    full = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aggregator",
        "status",
        "--json",
        stdout=dev_full,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DATABASE_URL": db},
        cwd=tmp_path,
    )
    os.close(dev_full)
    _, err = await asyncio.wait_for(full.communicate(), 60)
    assert full.returncode == 2, err.decode()
    assert err.decode() == "aggregator: error: cannot write the output: No space left on device\n"


def test_cli_without_schema_exits_2(empty_db, tmp_path) -> None:
    line = one_line_error(aggregator("status", env={"DATABASE_URL": empty_db}, cwd=tmp_path))
    assert "run `aggregator migrate`" in line


def test_html_report_to_an_unwritable_place_is_one_line_exit_2(db, tmp_path) -> None:
    target = tmp_path / "no-such-dir" / "report.html"
    line = one_line_error(
        aggregator("status", "--html", str(target), env={"DATABASE_URL": db}, cwd=tmp_path)
    )
    assert line == f"aggregator: error: cannot write --html {target}: No such file or directory"
    assert not target.parent.exists()


@pytest.mark.parametrize(
    ("command", "option"), [(["status", "--html"], "--html"), (["demo", "--report"], "--report")]
)
@pytest.mark.parametrize("path", ["", ".", "/", ".."])
def test_a_report_path_that_names_no_file_is_one_line_exit_2(db, tmp_path, command, option, path):
    """`--html ''` (an empty variable in a script), `.`, `/` or `..` name a directory, not a
    file: one usage line, exit 2, before anything runs (it was a traceback)."""
    result = aggregator(*command, path, env={"DATABASE_URL": db}, cwd=tmp_path)
    line = one_line_error(result)
    assert f"argument {option}: must name a file, got {path!r}" in line
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
