"""`aggregator status`: freshness rules as pure functions, the SQL on real Postgres, the CLI as
cron and monitors run it (exit 0 fresh, 1 stale, 2 unusable)."""

import json
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from aggregator import status, storage
from aggregator.dates import today_in
from aggregator.model import SiteError
from aggregator.status import RunSummary, SourceFacts, build_report
from tests.factories import add_account, add_site
from tests.test_cli import aggregator, one_line_error

TODAY = date(2024, 5, 10)
LONG_AGO = date(2020, 1, 1)


def days_back(first: int, last: int, today: date = TODAY) -> frozenset[date]:
    """Days from `first` to `last` days before today, inclusive."""
    return frozenset(today - timedelta(days=n) for n in range(last, first - 1, -1))


def facts(source: str, last: date | None, days=frozenset(), deployed=LONG_AGO, **kw):
    return SourceFacts("example.com", source, deployed, last, days, **kw)


def one(fact: SourceFacts) -> status.SourceStatus:
    return build_report(TODAY, [fact], []).sources[0]


def test_matomo_is_due_yesterday_and_gsc_final_three_days_ago() -> None:
    assert not one(facts("matomo", TODAY - timedelta(days=1))).stale
    assert one(facts("matomo", TODAY - timedelta(days=2))).stale
    assert not one(facts("gsc", TODAY - timedelta(days=3))).stale
    assert one(facts("gsc", TODAY - timedelta(days=4))).stale
    assert one(facts("gsc", None)).stale


def test_a_site_deployed_after_the_target_day_is_not_yet_due() -> None:
    fresh = one(facts("gsc", None, deployed=TODAY - timedelta(days=2)))
    assert not fresh.stale
    assert fresh.expected_days == 0


def test_missing_days_count_only_the_window_ending_at_the_target() -> None:
    # Matomo's window is the 30 days ending yesterday; two gaps inside it, one day outside.
    present = days_back(1, 30) - {TODAY - timedelta(days=5), TODAY - timedelta(days=9)}
    result = one(facts("matomo", TODAY - timedelta(days=1), present | {TODAY - timedelta(40)}))
    assert result.expected_days == 30
    assert result.missing == (TODAY - timedelta(days=9), TODAY - timedelta(days=5))


def test_days_before_deployment_are_not_missing() -> None:
    result = one(facts("matomo", None, deployed=TODAY - timedelta(days=4)))
    assert result.expected_days == 4  # deployment day through yesterday
    assert len(result.missing) == 4


def test_completion_rate_counts_site_day_source_cells() -> None:
    report = build_report(
        TODAY,
        [
            facts("matomo", TODAY - timedelta(days=1), days_back(1, 30)),  # 30 of 30
            facts("gsc", TODAY - timedelta(days=3), days_back(3, 22)),  # 20 of 30
        ],
        [],
    )
    assert report.completion() == (50, 60)
    assert report.completion("gsc") == (20, 30)
    payload = status.as_json(report)
    assert payload["completion"]["rate"] == round(50 / 60, 4)
    assert payload["completion"]["sources"]["matomo"]["rate"] == 1.0


def test_render_marks_stale_rows_and_summarises_runs() -> None:
    started = datetime(2024, 5, 10, 0, 0, tzinfo=UTC)
    run = RunSummary(started, started + timedelta(seconds=95), "partial", 12, 3, "gsc a.com: 403")
    report = build_report(
        TODAY,
        [facts("matomo", TODAY - timedelta(days=1)), facts("gsc", TODAY - timedelta(days=7))],
        [run],
    )
    text = status.render(report, ZoneInfo("Europe/Berlin"))
    lines = text.splitlines()
    matomo_line, gsc_line = (line for line in lines if line.startswith("example.com"))
    assert gsc_line.endswith("STALE") and matomo_line.endswith("ok")
    assert "2024-05-10 02:00  partial  95s" in text  # started in the configured zone
    assert "gsc a.com: 403" in text
    assert lines[-1].startswith("STALE: 1 of 2")


async def test_load_facts_reads_configured_sources_of_monitored_sites(conn) -> None:
    today = date(2024, 5, 10)
    account = await add_account(conn, "a@example.com", "tok")
    both = await add_site(conn, "both.com", matomo_site_id=1, gsc_account_id=account)
    await add_site(conn, "matomo-only.com", matomo_site_id=2)
    await add_site(conn, "retired.com", matomo_site_id=3, active=False)
    await deploy_all(conn, date(2024, 1, 1))
    await storage.upsert_daily_rows(
        conn,
        [
            storage.DailyRow(both, date(2024, 5, 8), matomo=(5, 9), gsc=(1, 10, 0.1, 3.0, False)),
            storage.DailyRow(both, date(2024, 5, 6), gsc=(2, 20, 0.1, 4.0, True)),
            storage.DailyRow(both, date(2024, 3, 1), matomo=(1, 1)),  # before the window
        ],
    )
    found = {(f.site, f.source): f for f in await status.load_facts(conn, today, ZoneInfo("UTC"))}
    assert set(found) == {
        ("both.com", "matomo"),
        ("both.com", "gsc"),
        ("matomo-only.com", "matomo"),
    }
    assert found["both.com", "matomo"].last_day == date(2024, 5, 8)
    assert found["both.com", "matomo"].days == {date(2024, 5, 8)}
    assert found["both.com", "gsc"].last_day == date(2024, 5, 6)
    assert found["both.com", "gsc"].provisional_until == date(2024, 5, 8)
    assert found["both.com", "gsc"].days == {date(2024, 5, 6)}
    assert found["matomo-only.com", "matomo"].last_day is None
    assert found["both.com", "matomo"].deployed_on == date(2024, 1, 1)


async def deploy_all(conn, day: date) -> None:
    await conn.execute(
        "update sites set deployed_at = $1", datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    )


async def seed_run(conn, errors: list[SiteError]) -> None:
    today = today_in(ZoneInfo("UTC"))
    run_id = await storage.start_run(conn, today, today, 1)
    await storage.finish_run(conn, run_id, status="partial", rows_upserted=7, errors=errors)


async def test_cli_exits_0_when_fresh_and_1_when_stale(db, conn, tmp_path) -> None:
    yesterday = today_in(ZoneInfo("UTC")) - timedelta(days=1)
    site = await add_site(conn, "fresh.com", matomo_site_id=1)
    await deploy_all(conn, yesterday)
    await storage.upsert_daily_rows(conn, [storage.DailyRow(site, yesterday, matomo=(3, 4))])
    await seed_run(conn, [SiteError("b.com", "matomo", "HTTP 500 from Matomo")])
    env = {"DATABASE_URL": db}

    fresh = aggregator("status", env=env, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "all fresh" in fresh.stdout
    assert "matomo b.com: HTTP 500 from Matomo" in fresh.stdout

    await add_site(conn, "stale.com", matomo_site_id=2)  # nothing stored
    await deploy_all(conn, yesterday)
    stale = aggregator("status", env=env, cwd=tmp_path)
    assert stale.returncode == 1, stale.stderr
    assert any(
        line.startswith("stale.com") and "STALE" in line for line in stale.stdout.splitlines()
    )


async def test_cli_json_is_one_document_with_the_report(db, conn, tmp_path) -> None:
    await add_site(conn, "stale.com", matomo_site_id=2)
    await deploy_all(conn, today_in(ZoneInfo("UTC")) - timedelta(days=10))
    await seed_run(conn, [])
    result = aggregator("status", "--json", env={"DATABASE_URL": db}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    payload = json.loads(result.stdout)
    assert payload["stale"] is True
    assert set(payload) >= {"today", "targets", "completion", "freshness", "runs"}
    (row,) = payload["freshness"]
    assert row["site"] == "stale.com" and row["source"] == "matomo" and row["stale"]
    assert payload["runs"][0]["rows_upserted"] == 7 and payload["runs"][0]["errors"] == 0


def test_cli_without_schema_exits_2(empty_db, tmp_path) -> None:
    line = one_line_error(aggregator("status", env={"DATABASE_URL": empty_db}, cwd=tmp_path))
    assert "run `aggregator migrate`" in line
