"""`aggregator check`: the pure verdict, then real Postgres + simulators, then the real CLI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aggregator import check, matomo, migrations
from aggregator.check import (
    AccountInfo,
    Facts,
    MatomoFacts,
    SchemaFacts,
    build_report,
    render,
    run_check,
)
from aggregator.config import Secret, Settings
from aggregator.demo import simulated_settings
from aggregator.model import GscAccount, Site
from aggregator.search_console.answers import ReadableProperties
from aggregator.search_console.client import AccountAccess
from aggregator.search_console.oauth import (
    MissingRefreshToken,
    ReconnectRequired,
    TokenEndpointRedirected,
)
from aggregator.simulators import GoogleSimulator
from aggregator.simulators import portfolio as world
from tests.factories import add_account, add_site, seed
from tests.test_hostile_network import ForeignHost, Redirector, garbled_sites_list
from tests.test_supabase import _ROLES as SUPABASE_ROLES

ROOT = Path(__file__).resolve().parent.parent
SECRETS = (world.MATOMO_TOKEN, world.CLIENT_SECRET, "demo-refresh-token-")
UP_TO_DATE = SchemaFacts(migration_files=("001_schema",), applied=frozenset({"001_schema"}))
ALICE = AccountInfo(1, "alice@example.com", True)
BOB = AccountInfo(2, "bob@example.com", True)


def facts(**changes) -> Facts:
    """A small healthy portfolio: two sites on Matomo and on two Google accounts."""
    base = {
        "database": "db.example:5432/postgres",
        "schema": UP_TO_DATE,
        "matomo_configured": True,
        "gsc_configured": True,
        "sites": (
            Site(1, "a.example", matomo_site_id=1, gsc_account_id=1),
            Site(
                2,
                "b.example",
                matomo_site_id=2,
                gsc_account_id=2,
                gsc_property="https://b.example/",
            ),
        ),
        "accounts": {1: ALICE, 2: BOB},
        "matomo_answer": MatomoFacts(viewable=frozenset({1, 2, 3})),
        "google_access": {
            1: AccountAccess(
                _account(ALICE), properties=ReadableProperties({"sc-domain:a.example"})
            ),
            2: AccountAccess(_account(BOB), properties=ReadableProperties({"https://B.example/"})),
        },
    }
    return Facts(**{**base, **changes})


def _account(info: AccountInfo) -> GscAccount:
    return GscAccount(info.id, info.email, "refresh")


def rows_of(report, level=None):
    return [(r.subject, r.check) for r in report.rows if level is None or r.level == level]


# --- the pure verdict --------------------------------------------------------------------------


def test_healthy_portfolio_has_no_rows_and_says_what_was_verified() -> None:
    report = build_report(facts())
    assert report.rows == ()
    assert report.exit_code == 0
    assert report.verified == (
        "database db.example:5432/postgres: schema up to date (001_schema)",
        "Matomo token: ok (2 of 2 sites readable)",
        "Google account alice@example.com: token ok, 1 of 1 site reachable",
        "Google account bob@example.com: token ok, 1 of 1 site reachable",
    )
    assert report.summary() == "checked 2 sites, 2 accounts: 0 problems, 0 warnings, 0 notes"


def test_unreadable_matomo_id_and_unreachable_property_are_problems() -> None:
    report = build_report(
        facts(
            matomo_answer=MatomoFacts(viewable=frozenset({2})),
            google_access={
                1: AccountAccess(
                    _account(ALICE), properties=ReadableProperties({"https://other.example/"})
                ),
                2: AccountAccess(
                    _account(BOB), properties=ReadableProperties({"https://b.example/"})
                ),
            },
        )
    )
    assert report.exit_code == 1
    assert rows_of(report, "problem") == [
        ("a.example", "matomo site"),
        ("a.example", "gsc property"),
    ]
    gsc_row = report.rows[1]
    # What the run would try, in the contract's order.
    assert "sc-domain:a.example, https://a.example/ or https://www.a.example/" in gsc_row.problem
    assert "Matomo token: ok (1 of 2 sites readable)" in report.verified


def test_stored_property_is_the_only_one_tried() -> None:
    access = AccountAccess(_account(BOB), properties=ReadableProperties({"sc-domain:b.example"}))
    report = build_report(facts(google_access={**facts().google_access, 2: access}))
    (row,) = report.rows
    assert row.subject == "b.example" and row.check == "gsc property"
    assert "cannot access https://b.example/ (sites.gsc_property)" in row.problem
    assert "sc-domain" not in row.problem


def test_revoked_token_is_one_row_for_the_account_with_the_runs_advice() -> None:
    message = (
        "Google refused the refresh token of account bob@example.com (invalid_grant): reconnect"
    )
    access = AccountAccess(_account(BOB), token_error=ReconnectRequired(message))
    report = build_report(facts(google_access={**facts().google_access, 2: access}))
    assert rows_of(report) == [("bob@example.com", "gsc token")]
    row = report.rows[0]
    assert row.problem.startswith(message) and "1 site without Search Console data" in row.problem
    assert "aggregator accounts add bob@example.com" in row.fix
    assert report.exit_code == 1


def test_missing_refresh_token_fix_names_the_variable() -> None:
    access = AccountAccess(_account(BOB), token_error=MissingRefreshToken("no refresh token"))
    report = build_report(facts(google_access={**facts().google_access, 2: access}))
    assert "GSC_REFRESH_TOKEN_2" in report.rows[0].fix


def test_sites_list_failure_is_one_row_for_the_account() -> None:
    access = AccountAccess(_account(ALICE), list_error="Search Console request failed 2 times")
    report = build_report(facts(google_access={**facts().google_access, 1: access}))
    assert rows_of(report) == [("alice@example.com", "gsc sites.list")]


def test_token_seeing_no_site_is_one_token_row_not_one_per_site() -> None:
    report = build_report(facts(matomo_answer=MatomoFacts(viewable=frozenset())))
    assert rows_of(report) == [("MATOMO_TOKEN", "matomo token")]


def test_refused_token_and_unreachable_matomo_are_told_apart() -> None:
    refused = build_report(facts(matomo_answer=MatomoFacts(error="refused", refused=True)))
    assert rows_of(refused) == [("MATOMO_TOKEN", "matomo token")]
    down = build_report(facts(matomo_answer=MatomoFacts(error="Matomo unreachable")))
    assert rows_of(down) == [("MATOMO_URL", "matomo")]
    assert down.rows[0].problem == "Matomo unreachable"


def test_unconfigured_sources_are_rows_not_crashes() -> None:
    report = build_report(
        facts(matomo_configured=False, gsc_configured=False, matomo_answer=None, google_access={})
    )
    assert rows_of(report, "problem") == [
        ("MATOMO_URL, MATOMO_TOKEN", "configuration"),
        ("GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET", "configuration"),
    ]
    assert "2 monitored sites" in report.rows[0].problem
    assert report.accounts == 0


def test_unconfigured_matomo_is_fine_when_no_site_needs_it() -> None:
    sites = (Site(1, "a.example", gsc_account_id=1),)
    report = build_report(
        facts(sites=sites, accounts={1: ALICE}, matomo_configured=False, matomo_answer=None)
    )
    assert rows_of(report, "problem") == []
    assert rows_of(report, "note") == [("a.example", "matomo")]
    assert "Matomo: not used (no monitored site has a matomo_site_id)" in report.verified
    assert report.exit_code == 0


def test_notes_and_warnings_do_not_fail_the_check() -> None:
    idle = AccountInfo(4, "idle@example.com", True)
    sites = (
        *facts().sites,
        Site(3, "nothing.example"),
        Site(4, "shared.example", matomo_site_id=1),
    )
    report = build_report(
        facts(sites=sites, accounts={1: ALICE, 2: BOB, 4: idle}, token_overrides=frozenset({2, 9}))
    )
    assert report.exit_code == 0
    assert rows_of(report, "warning") == [
        ("matomo_site_id 1", "matomo"),
        ("GSC_REFRESH_TOKEN_9", "configuration"),
    ]
    assert rows_of(report, "note") == [
        ("nothing.example", "matomo"),
        ("nothing.example", "gsc"),
        ("shared.example", "gsc"),
        ("idle@example.com", "gsc account"),
    ]
    assert report.summary().endswith("0 problems, 2 warnings, 4 notes")


def test_a_site_on_an_inactive_account_is_a_problem_as_every_run_skips_it() -> None:
    """A run that skips a site is not ok (exit 1), so check cannot call that well (exit 0)."""
    old = AccountInfo(3, "old@example.com", False)
    sites = (*facts().sites, Site(4, "stale.example", matomo_site_id=1, gsc_account_id=3))
    report = build_report(facts(sites=sites, accounts={1: ALICE, 2: BOB, 3: old}))
    assert rows_of(report, "problem") == [("old@example.com", "gsc account")]
    assert "1 monitored site (stale.example)" in report.rows[0].problem
    assert report.exit_code == 1


def test_missing_tables_stop_the_check_with_a_migrate_row() -> None:
    report = build_report(
        Facts(database="db", schema=SchemaFacts(missing_tables=("sites", "gsc_accounts")))
    )
    assert [(r.level, r.check, r.fix) for r in report.rows] == [
        ("problem", "schema", "run `aggregator migrate`")
    ]
    assert "no table sites, gsc_accounts" in report.rows[0].problem
    assert report.exit_code == 1


def test_migration_bookkeeping() -> None:
    files = ("001_schema", "002_more")
    pending = build_report(
        facts(schema=SchemaFacts(migration_files=files, applied=frozenset({"001_schema"})))
    )
    assert [(r.level, r.problem) for r in pending.rows] == [("problem", "not applied: 002_more")]
    unrecorded = build_report(facts(schema=SchemaFacts(migration_files=files, applied=None)))
    assert [r.level for r in unrecorded.rows] == ["warning"] and unrecorded.exit_code == 0
    newer = build_report(
        facts(schema=SchemaFacts(migration_files=files[:1], applied=frozenset(files)))
    )
    assert [r.level for r in newer.rows] == ["warning"]
    assert "002_more" in newer.rows[0].problem


def test_render_is_one_aligned_table_problems_first_then_the_summary() -> None:
    report = build_report(
        facts(
            sites=(*facts().sites, Site(3, "nothing.example")),
            matomo_answer=MatomoFacts(viewable=frozenset({2})),
        )
    )
    lines = render(report, problem_width=40, fix_width=30).splitlines()
    header, problem, wrapped = lines[0], lines[1], lines[2]
    assert header.split() == ["level", "subject", "check", "problem", "how", "to", "fix"]
    assert problem.startswith("PROBLEM  a.example        matomo site")
    # A long problem or fix wraps inside its own column; the other cells stay blank.
    fix_column = header.index("how to fix")
    assert wrapped[: header.index("problem")].strip() == ""
    assert problem[fix_column:].startswith("correct sites.matomo_site_id,")
    assert all(len(line[fix_column:]) <= 30 for line in lines[1:4])
    notes = [line for line in lines if line.startswith("note")]
    assert [line.split()[1:3] for line in notes] == [
        ["nothing.example", "matomo"],
        ["nothing.example", "gsc"],
    ]
    assert {line.index(" matomo ") for line in (problem, notes[0])} == {header.index(" check")}
    assert lines[-1] == "checked 3 sites, 2 accounts: 1 problem, 0 warnings, 2 notes"
    assert "ok  Matomo token: ok (1 of 2 sites readable)" in lines


# --- real Postgres and simulators over 127.0.0.1 ----------------------------------------------


def settings_for(db: str, matomo_sim, google_sim, **changes):
    settings = simulated_settings(db, matomo_sim.url, google_sim.url, gsc_max_qps_per_client=100)
    return dataclasses.replace(settings, **changes)


async def test_healthy_portfolio_costs_one_matomo_request_and_two_per_account(db, conn) -> None:
    portfolio = world.make_portfolio(60, 3)
    await seed(db, portfolio)
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        world.google_simulator(portfolio) as google_sim,
    ):
        report = await run_check(settings_for(db, matomo_sim, google_sim))
        assert matomo_sim.requests == 1
        assert matomo_sim.calls == {matomo.VIEW_ACCESS_METHOD: 1}
        assert google_sim.token_requests == 3
        assert google_sim.sites_requests == 3
        assert google_sim.query_requests == 0

    assert report.exit_code == 0, render(report)
    assert rows_of(report, "problem") == rows_of(report, "warning") == []
    # Every 25th site has no Matomo id, every 30th no Google account.
    assert rows_of(report, "note") == [
        ("site00025.example", "matomo"),
        ("site00030.example", "gsc"),
        ("site00050.example", "matomo"),
        ("site00060.example", "gsc"),
    ]
    assert "Matomo token: ok (58 of 58 sites readable)" in report.verified
    assert "Google account seo-team-1@demo.example: token ok, 20 of 20 sites reachable" in (
        report.verified
    )
    assert report.summary() == "checked 60 sites, 3 accounts: 0 problems, 0 warnings, 4 notes"
    refreshed = await conn.fetch("select last_refresh_at, last_error from gsc_accounts")
    assert all(r["last_refresh_at"] is not None and r["last_error"] is None for r in refreshed)


async def test_broken_portfolio_names_each_problem(db, conn) -> None:
    portfolio = world.make_portfolio(30, 3, revoked_account=True, unreachable_every=7)
    await seed(db, portfolio)
    await conn.execute(
        "insert into sites (id, domain, deployed_at, matomo_site_id, gsc_account_id)"
        " values (1000, 'ghost.example', now(), 99999, 1)"
    )
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        world.google_simulator(portfolio) as google_sim,
    ):
        report = await run_check(settings_for(db, matomo_sim, google_sim))
        assert matomo_sim.requests == 1
        assert google_sim.token_requests == 3 and google_sim.sites_requests == 2

    assert report.exit_code == 1
    problems = rows_of(report, "problem")
    # Sites 7, 14 and 28 are unverified on live accounts; 21 belongs to the revoked account 3.
    assert sorted(problems) == [
        ("ghost.example", "gsc property"),
        ("ghost.example", "matomo site"),
        ("seo-team-3@demo.example", "gsc token"),
        ("site00007.example", "gsc property"),
        ("site00014.example", "gsc property"),
        ("site00028.example", "gsc property"),
    ]
    by_key = {(r.subject, r.check): r for r in report.rows}
    revoked = by_key["seo-team-3@demo.example", "gsc token"]
    assert "reconnect" in revoked.problem.lower() and "invalid_grant" in revoked.problem
    assert "aggregator accounts add seo-team-3@demo.example" in revoked.fix
    assert "Matomo site id 99999" in by_key["ghost.example", "matomo site"].problem
    assert "sc-domain:site00007.example" in by_key["site00007.example", "gsc property"].problem
    assert "Matomo token: ok (29 of 30 sites readable)" in report.verified
    # The refresh is recorded as a run records it.
    accounts = {r["email"]: r for r in await conn.fetch("select * from gsc_accounts")}
    assert "invalid_grant" in accounts["seo-team-3@demo.example"]["last_error"]
    assert accounts["seo-team-1@demo.example"]["last_refresh_at"] is not None
    text = render(report)
    assert not any(secret in text for secret in SECRETS)


async def test_wrong_matomo_token_is_one_row(db) -> None:
    portfolio = world.make_portfolio(10, 1)
    await seed(db, portfolio)
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        world.google_simulator(portfolio) as google_sim,
    ):
        settings = settings_for(db, matomo_sim, google_sim, matomo_token=Secret("wrong-token"))
        report = await run_check(settings)
        assert matomo_sim.requests == 1
    assert rows_of(report, "problem") == [("MATOMO_TOKEN", "matomo token")]
    assert report.exit_code == 1


async def test_unreachable_matomo_is_a_row(db, monkeypatch) -> None:
    monkeypatch.setattr(matomo, "BACKOFF_INITIAL_SECONDS", 0.01)
    portfolio = world.make_portfolio(5, 1)
    await seed(db, portfolio)
    async with world.google_simulator(portfolio) as google_sim:
        settings = simulated_settings(db, "http://127.0.0.1:1", google_sim.url)
        report = await run_check(settings)
    assert rows_of(report, "problem") == [("MATOMO_URL", "matomo")]
    assert "unreachable after 2 attempts" in report.rows[0].problem


async def test_unconfigured_sources_and_no_network_without_sites(db, conn) -> None:
    account = await add_account(conn, "a@example.com", "tok")
    await add_site(conn, "a.example", matomo_site_id=1, gsc_account_id=account)
    report = await run_check(Settings(database_url=Secret(db)))
    assert rows_of(report, "problem") == [
        ("MATOMO_URL, MATOMO_TOKEN", "configuration"),
        ("GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET", "configuration"),
    ]
    # Nothing was refreshed, so nothing was recorded.
    assert await conn.fetchval("select last_refresh_at from gsc_accounts") is None


async def test_missing_schema_is_a_row(empty_db) -> None:
    missing = await run_check(Settings(database_url=Secret(empty_db)))
    assert [(r.check, r.fix) for r in missing.rows] == [("schema", "run `aggregator migrate`")]
    assert missing.exit_code == 1


async def test_pending_and_unknown_migrations_are_rows(db, conn) -> None:
    await conn.execute("delete from aggregator_schema_migrations")
    await conn.execute("insert into aggregator_schema_migrations values ('000_old')")
    pending = await run_check(Settings(database_url=Secret(db)))
    every = ", ".join(path.stem for path in migrations.migration_files())
    assert [(r.level, r.problem) for r in pending.rows if r.check == "schema"] == [
        ("problem", f"not applied: {every}"),
        ("warning", "applied migrations this version does not have: 000_old"),
    ]


async def test_missing_column_is_reported(db, conn) -> None:
    await conn.execute("alter table sites drop column gsc_property")
    report = await run_check(Settings(database_url=Secret(db)))
    assert [(r.problem, r.fix) for r in report.rows] == [
        (
            "missing column sites.gsc_property; sites and accounts not checked",
            "run `aggregator migrate`: it adds the column back",
        )
    ]


async def test_a_daily_analytics_keyed_on_the_site_alone_is_a_problem_and_migrate_refuses(
    db, conn
) -> None:
    """What older versions let through (a unique (site_id, date) beside a primary key
    (site_id)): every run fails on it, so check names the fix and migrate refuses to call the
    database up to date."""
    await conn.execute(
        "alter table daily_analytics drop constraint daily_analytics_pkey,"
        " add primary key (site_id), add unique (site_id, date)"
    )
    report = await run_check(Settings(database_url=Secret(db)))
    assert [(r.level, r.problem, r.fix) for r in report.rows if r.check == "schema"] == [
        (
            "problem",
            "table daily_analytics, columns site_id, date: primary key daily_analytics_pkey is "
            "(site_id), but the aggregator needs primary key (site_id, date) and no narrower "
            "unique key (one row per site and day)",
            "alter table daily_analytics drop constraint daily_analytics_pkey, add primary key "
            "(site_id, date)",
        )
    ]
    assert report.exit_code == 1
    with pytest.raises(migrations.MigrationError, match="drop constraint daily_analytics_pkey"):
        await migrations.apply_migrations(conn)


# --- the command line, as a real process ------------------------------------------------------


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MATOMO_", "GOOGLE_", "GSC_"))}
    base.pop("DATABASE_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aggregator",
        *args,
        env={**base, **env},
        cwd=ROOT / "tests",  # no .env there
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, out.decode(), err.decode()


def sim_env(db: str, matomo_sim, google_sim) -> dict[str, str]:
    return {
        "DATABASE_URL": db,
        "MATOMO_URL": matomo_sim.url,
        "MATOMO_TOKEN": world.MATOMO_TOKEN,
        "GOOGLE_CLIENT_ID": world.CLIENT_ID,
        "GOOGLE_CLIENT_SECRET": world.CLIENT_SECRET,
        "GOOGLE_TOKEN_URL": f"{google_sim.url}/token",
        "GSC_API_URL": google_sim.url,
        "GSC_MAX_QPS_PER_CLIENT": "100",
    }


@contextlib.asynccontextmanager
async def served(
    db: str, portfolio: world.Portfolio
) -> AsyncIterator[tuple[dict, GoogleSimulator]]:
    """`portfolio` seeded into `db` and served by both simulators: the environment a `check`
    process runs with, and the Google simulator (to change it while it runs)."""
    await seed(db, portfolio)
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        world.google_simulator(portfolio) as google_sim,
    ):
        yield sim_env(db, matomo_sim, google_sim), google_sim


async def test_cli_exit_codes_and_output(db) -> None:
    async with served(db, world.make_portfolio(20, 2)) as (env, google_sim):
        code, out, err = await cli("check", env=env)
        assert code == 0, out + err
        assert (
            out.splitlines()[-1] == "checked 20 sites, 2 accounts: 0 problems, 0 warnings, 0 notes"
        )

        # Revoke account 2 in the running simulator: exit 1, and the JSON says why.
        google_sim.revoke("demo-refresh-token-2")
        code, out, err = await cli("check", "--json", env=env)
        assert code == 1, out + err
        document = json.loads(out)
        assert document["ok"] is False and document["problems"] == 1
        assert document["rows"][0]["subject"] == "seo-team-2@demo.example"
        assert document["rows"][0]["check"] == "gsc token"
        for secret in SECRETS:
            assert secret not in out and secret not in err


async def test_check_prints_only_its_table_and_logs_warnings_only_with_v(db) -> None:
    """A revoked token is a row of the table, not a log warning above it: stdout is the table
    alone and stderr empty; with -v the table again, and the refusal in the log."""
    async with served(db, world.make_portfolio(6, 2, revoked_account=True)) as (env, _google):
        code, out, err = await cli("check", env=env)
        verbose_code, verbose_out, verbose_err = await cli("check", "-v", env=env)

    assert code == verbose_code == 1, out + err
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["level", "subject", "check", "problem", "how", "to", "fix"]
    assert lines[1].startswith("PROBLEM  seo-team-2@demo.example  gsc token  Google refused")
    summary = lines.index("")  # the table's rows, a blank line, then what was verified
    assert [line.split()[0] for line in lines[summary + 1 : -1]] == ["ok", "ok", "ok"]
    assert lines[-1] == "checked 6 sites, 2 accounts: 1 problem, 0 warnings, 0 notes"
    # With -v the log (stderr) holds the refusal; stdout is still the table alone.
    assert verbose_out.splitlines()[0].split() == lines[0].split()
    assert not any(line.startswith("{") for line in verbose_out.splitlines())
    events = [json.loads(line) for line in verbose_err.splitlines()]
    refusals = [e["account"] for e in events if e["event"] == "gsc.token_refresh_failed"]
    assert refusals == ["seo-team-2@demo.example"]


async def test_cli_exit_2_for_unreachable_database_and_1_for_missing_schema(empty_db) -> None:
    code, out, err = await cli(
        "check", env={"DATABASE_URL": "postgresql://postgres:s3cr3t@127.0.0.1:1/db"}
    )
    assert code == 2 and out == ""
    assert (
        err.strip().splitlines() == [err.strip()]
        and "cannot connect to database at 127.0.0.1:1/db" in err
    )
    assert "s3cr3t" not in err

    code, out, err = await cli("check", env={"DATABASE_URL": empty_db})
    assert code == 1, err
    assert "run `aggregator migrate`" in out

    code, _, err = await cli("check", env={})
    assert code == 2 and "DATABASE_URL is not set" in err


def test_a_redirecting_token_endpoint_is_one_row_for_the_setting_not_one_per_account() -> None:
    refused = TokenEndpointRedirected(
        "cannot refresh the token of Google account alice@example.com: The token endpoint "
        "answered HTTP 302 redirecting to https://sso.example; redirects "
        "are not followed, so nothing was sent there: if that is the right server, set "
        "GOOGLE_TOKEN_URL to the address it redirects to"
    )
    access = {info.id: AccountAccess(_account(info), token_error=refused) for info in (ALICE, BOB)}
    report = build_report(facts(google_access=access))
    assert rows_of(report) == [("GOOGLE_TOKEN_URL", "token endpoint")]
    (row,) = report.rows
    assert row.level == "problem" and report.exit_code == 1
    assert "redirecting to https://sso.example" in row.problem and "2 sites" in row.problem
    assert "https://oauth2.googleapis.com/token" in row.fix
    assert "accounts add" not in render(report) and "alice@" not in row.problem


async def test_check_through_a_redirecting_token_endpoint_names_the_setting_once(db) -> None:
    portfolio = world.make_portfolio(6, 3)
    await seed(db, portfolio)
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        world.google_simulator(portfolio) as google_sim,
        Redirector(google_sim.url) as redirector,
    ):
        settings = settings_for(
            db, matomo_sim, google_sim, google_token_url=f"{redirector.url}/token"
        )
        report = await run_check(settings)
        assert redirector.requests == 3 and google_sim.token_requests == 0
        target = google_sim.url

    assert [r for r in report.rows if r.level != "note"] == [
        r for r in report.rows if r.subject == "GOOGLE_TOKEN_URL"
    ]
    (row,) = [r for r in report.rows if r.subject == "GOOGLE_TOKEN_URL"]
    assert row.problem.startswith(f"The token endpoint answered HTTP 302 redirecting to {target};")
    assert "landing=secret-path" not in row.problem
    assert "reconnect" not in row.fix.replace("reconnecting accounts does not help", "")


async def test_the_columns_check_requires_are_the_migrations_typed_ones(conn) -> None:
    """check's list is derived from migrations' (one list, with types), and a migrated schema
    has every column of it with a type the list accepts."""
    assert migrations.required_columns() == check.REQUIRED_COLUMNS
    assert check.REQUIRED_COLUMNS["aggregator_runs"][-1] == "stats"
    typed = {
        (table, column): accepted
        for columns in (migrations.EXPECTED_COLUMNS, migrations.LATER_COLUMNS)
        for table, spec in columns.items()
        for column, accepted in spec.items()
    }
    rows = await conn.fetch(
        """
        select c.relname as t, a.attname as c, format_type(a.atttypid, null) as type
        from pg_attribute a join pg_class c on c.oid = a.attrelid
        where c.relname = any($1::text[]) and a.attnum > 0 and not a.attisdropped
          and c.relnamespace = current_schema()::regnamespace
        """,
        list(check.REQUIRED_COLUMNS),
    )
    found = {(r["t"], r["c"]): r["type"] for r in rows}
    for (table, column), accepted in typed.items():
        assert found.get((table, column)) in accepted, (table, column, found.get((table, column)))
    assert len(typed) == sum(map(len, check.REQUIRED_COLUMNS.values()))


async def test_check_through_a_token_endpoint_answering_a_page_is_a_row_not_a_crash(db) -> None:
    """A token endpoint answering 200 with a page instead of a token (a captive portal, a
    wrong GOOGLE_TOKEN_URL): `check` prints its table with a row naming GOOGLE_TOKEN_URL and
    exits 1, with nothing on stderr."""
    async with (
        served(db, world.make_portfolio(4, 2)) as (env, _google),
        ForeignHost("<html>Please sign in</html>", content_type="text/html") as portal,
    ):
        env = {**env, "GOOGLE_TOKEN_URL": f"{portal.url}/token"}
        code, out, err = await cli("check", env=env)
    assert code == 1 and err == "", out + err
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert problems and all("GOOGLE_TOKEN_URL" in line for line in problems), out


async def test_check_through_a_sites_list_that_is_no_listing_is_one_row_per_account(db) -> None:
    portfolio = world.make_portfolio(4, 2)
    await seed(db, portfolio)
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        garbled_sites_list(portfolio, "sc-domain:site00001.example") as google_sim,
    ):
        report = await run_check(settings_for(db, matomo_sim, google_sim))
    problems = [r for r in report.rows if r.level == "problem"]
    assert sorted(r.subject for r in problems) == [a.email for a in portfolio.accounts]
    assert all("sites.list with unusable data" in r.problem for r in problems), problems


async def test_a_gsc_accounts_opened_to_the_api_roles_after_migrating_is_a_problem(
    db, conn
) -> None:
    """Row level security turned off and a grant to anon after migrating hand every refresh
    token to Supabase's API: check names it as a problem with the revoke, and migrate refuses
    to call the schema up to date."""
    await conn.execute(SUPABASE_ROLES)
    await conn.execute(
        "alter table gsc_accounts disable row level security; grant select on gsc_accounts to anon"
    )
    report = await run_check(Settings(database_url=Secret(db)))
    assert [(r.level, r.problem, r.fix) for r in report.rows if r.check == "schema"] == [
        (
            "problem",
            "table gsc_accounts: its rows (refresh tokens) are readable by anon",
            "revoke all on gsc_accounts from anon",
        )
    ]
    assert report.exit_code == 1
    with pytest.raises(migrations.MigrationError, match="revoke all on gsc_accounts from anon"):
        await migrations.apply_migrations(conn)
    await conn.execute("revoke all on gsc_accounts from anon")
    assert not [r for r in (await run_check(Settings(database_url=Secret(db)))).rows]
