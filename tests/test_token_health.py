"""Token health: when an account was connected, when its token last refreshed, since when it
keeps failing and why; `check` refreshes every active account, those without sites too."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta

import asyncpg

from aggregator import migrations, storage, token_health
from aggregator.check import AccountInfo, build_report, render, run_check
from aggregator.dates import Window
from aggregator.demo import simulated_settings
from aggregator.model import AccountRefresh, GscAccount
from aggregator.pipeline import RunRequest, run_job
from aggregator.search_console.answers import ReadableProperties
from aggregator.search_console.client import AccountAccess
from aggregator.search_console.oauth import ReconnectRequired
from aggregator.simulators import portfolio as world
from aggregator.token_health import TokenHealth
from tests.factories import add_account, migrated_before, seed
from tests.test_check import facts, settings_for

NOW = datetime(2024, 5, 10, 12, tzinfo=UTC)
DEAD = "Google refused the refresh token of account bob@example.com (invalid_grant: Token has been expired or revoked.)"


def test_a_refresh_starts_or_ends_a_failure_streak() -> None:
    healthy = TokenHealth(connected_at=NOW - timedelta(days=30), last_success_at=NOW)
    first = healthy.after(AccountRefresh(1, NOW + timedelta(days=1), "invalid_grant"))
    again = first.after(AccountRefresh(1, NOW + timedelta(days=2), "invalid_grant"))
    assert first.failing_since == again.failing_since == NOW + timedelta(days=1)
    assert again.last_success_at == NOW  # a failure never moves the last success
    healed = again.after(AccountRefresh(1, NOW + timedelta(days=3)))
    assert healed.failing_since is None and not healed.failing
    assert healed.last_success_at == NOW + timedelta(days=3)
    assert healthy.after(None) == healthy


def test_failure_causes_testing_expiry_revocation_client() -> None:
    connected = NOW - timedelta(days=8)

    def dead(since: datetime, error: str = "invalid_grant: expired") -> TokenHealth:
        return TokenHealth(connected, connected, since, error)

    assert "Testing" in token_health.failure_cause(dead(connected + timedelta(days=7)))
    assert "revoked" in token_health.failure_cause(dead(connected + timedelta(days=3)))
    client = dead(NOW, "invalid_client: The OAuth client was not found.")
    assert "client was deleted" in token_health.failure_cause(client)
    assert "deleted" in token_health.failure_cause(dead(NOW, "deleted_client: gone"))
    unused = TokenHealth(None, NOW - timedelta(days=200), NOW, "invalid_grant: expired")
    assert "six months" in token_health.failure_cause(unused)
    assert token_health.failure_cause(dead(NOW, "temporarily_unavailable")) is None


def test_a_young_token_warns_of_the_testing_deadline() -> None:
    young = TokenHealth(connected_at=NOW - timedelta(days=2), last_success_at=NOW)
    assert token_health.testing_deadline(young, NOW) == date(2024, 5, 15)
    old = TokenHealth(connected_at=NOW - timedelta(days=9), last_success_at=NOW)
    assert token_health.testing_deadline(old, NOW) is None
    assert token_health.summary(young, NOW) == "connected 2 days ago, last refresh ok just now"


def _bob(health: TokenHealth) -> AccountInfo:
    return AccountInfo(2, "bob@example.com", True, health)


def test_check_says_since_when_and_why_refreshes_keep_failing() -> None:
    connected = NOW - timedelta(days=9)
    health = TokenHealth(connected, connected + timedelta(days=6), connected + timedelta(days=7))
    failed = AccountRefresh(2, NOW, DEAD)
    access = AccountAccess(
        GscAccount(2, "bob@example.com", "rt"),
        token_error=ReconnectRequired(DEAD),
        refresh=failed,
    )
    base = facts()
    report = build_report(
        facts(
            accounts={**base.accounts, 2: _bob(health)},
            google_access={**base.google_access, 2: access},
            now=NOW,
        )
    )
    rows = {(r.level, r.check): r for r in report.rows}
    streak = rows["warning", "token health"]
    assert streak.problem.startswith("refreshes keep failing since 2024-05-08 (2 days ago)")
    assert '"Testing"' in streak.problem and "In production" in streak.fix
    token = rows["problem", "gsc token"]
    assert "connected 9 days ago" in token.problem and "failing since 2024-05-08" in token.problem
    assert report.exit_code == 1


def test_check_notes_a_young_tokens_testing_deadline_and_shows_its_age() -> None:
    young = TokenHealth(connected_at=NOW - timedelta(days=3))
    base = facts()
    access = AccountAccess(
        GscAccount(2, "bob@example.com", "rt"),
        properties=ReadableProperties({"https://b.example/"}),
        refresh=AccountRefresh(2, NOW),
    )
    report = build_report(
        facts(
            accounts={**base.accounts, 2: _bob(young)},
            google_access={**base.google_access, 2: access},
            now=NOW,
        )
    )
    (note,) = [r for r in report.rows if r.check == "token health"]
    assert note.level == "note" and "dies on 2024-05-14" in note.problem
    assert "Google account bob@example.com: token ok (connected 3 days ago), 1 of 1 site" in (
        render(report)
    )
    assert report.exit_code == 0


async def test_check_refreshes_accounts_without_sites_and_records_the_streak(db, conn) -> None:
    portfolio = world.make_portfolio(10, 1)
    await seed(db, portfolio)
    idle = await conn.fetchval(
        "insert into gsc_accounts (id, email, refresh_token) values (100, $1, 'rt-unknown')"
        " returning id",
        "idle@demo.example",
    )
    async with (
        world.matomo_simulator(portfolio) as matomo_sim,
        world.google_simulator(portfolio) as google_sim,
    ):
        settings = settings_for(db, matomo_sim, google_sim)
        first = await run_check(settings)
        assert google_sim.token_requests == 2  # the idle account's token is refreshed too
        since = await conn.fetchval("select failing_since from gsc_accounts where id = $1", idle)
        second = await run_check(settings)
        assert (
            await conn.fetchval("select failing_since from gsc_accounts where id = $1", idle)
            == since
        )  # the streak keeps its first failure

        # Without sites a dead token is a warning, not a problem: no data is lost yet.
        assert first.exit_code == second.exit_code == 0, render(second)
        warned = {(r.subject, r.check) for r in second.rows if r.level == "warning"}
        assert {("idle@demo.example", "gsc token"), ("idle@demo.example", "token health")} <= warned

        live = portfolio.accounts[0].refresh_token
        await conn.execute("update gsc_accounts set refresh_token = $1 where id = $2", live, idle)
        healed = await run_check(settings)
    row = await conn.fetchrow("select * from gsc_accounts where id = $1", idle)
    assert row["failing_since"] is None and row["last_error"] is None
    assert row["last_refresh_at"] is not None
    assert not [r for r in healed.rows if r.subject == "idle@demo.example" and r.level != "note"]


async def test_recording_refreshes_works_on_a_schema_before_005(conn) -> None:
    account = await add_account(conn, "a@example.com", "rt")
    await conn.execute("alter table gsc_accounts drop column failing_since")
    await storage.record_account_refreshes(conn, [AccountRefresh(account, NOW, "invalid_grant")])
    assert await conn.fetchval("select last_error from gsc_accounts") == "invalid_grant"


async def test_every_refresh_attempt_is_recorded_success_or_failure(db, conn) -> None:
    """The contract: last_refresh_at/last_error are updated after each refresh attempt. Runs
    against the Google simulator: a success, a token endpoint nobody answers, a revoked token,
    then a success again."""
    portfolio = await seed(db, world.make_portfolio(6, 1))
    account = portfolio.accounts[0]
    request = RunRequest(Window(date(2025, 6, 1), date(2025, 6, 3)), sources=("gsc",))

    async def run(settings) -> asyncpg.Record:
        before = datetime.now(UTC)
        await run_job(settings, request)
        row = await conn.fetchrow("select * from gsc_accounts where id = $1", account.id)
        assert before <= row["last_refresh_at"] <= datetime.now(UTC)  # this run's attempt
        return row

    async with world.google_simulator(portfolio) as google:
        live = simulated_settings(db, google.url, google.url, http_max_attempts=1)
        ok = await run(live)
        assert ok["last_error"] is None and ok["failing_since"] is None
        assert ok["last_success_at"] == ok["last_refresh_at"]

        dead_endpoint = dataclasses.replace(live, google_token_url="http://127.0.0.1:1/token")
        down = await run(dead_endpoint)
        assert down["last_refresh_at"] > ok["last_refresh_at"]
        assert down["last_error"] and "\n" not in down["last_error"]
        assert down["failing_since"] == down["last_refresh_at"]  # the streak starts here
        assert down["last_success_at"] == ok["last_refresh_at"]  # a failure never moves it

        google.revoke(account.refresh_token)
        revoked = await run(live)
        assert "invalid_grant" in revoked["last_error"] and "\n" not in revoked["last_error"]
        assert revoked["failing_since"] == down["last_refresh_at"]  # the same streak
        assert revoked["last_success_at"] == ok["last_refresh_at"]
        (health,) = await token_health.load_accounts(conn)
        assert health.health.failing and health.health.last_success_at == ok["last_refresh_at"]

        google.reinstate(account.refresh_token)
        healed = await run(live)
    assert healed["last_error"] is None and healed["failing_since"] is None
    assert healed["last_success_at"] == healed["last_refresh_at"]
    # An attempt older than the recorded one (a `check` racing a run) changes nothing.
    stale = AccountRefresh(account.id, ok["last_refresh_at"], "invalid_grant: stale")
    await storage.record_account_refreshes(conn, [stale])
    assert await conn.fetchrow("select * from gsc_accounts where id = $1", account.id) == healed


async def test_migration_006_keeps_the_last_success_of_existing_accounts(
    empty_db, tmp_path
) -> None:
    """Before 006 last_refresh_at held the last success: existing accounts keep it as
    last_success_at, and applying the migrations again changes nothing."""
    async with migrated_before(empty_db, "006", tmp_path) as conn:
        account = await add_account(conn, "a@example.com", "rt")
        await conn.execute("update gsc_accounts set last_refresh_at = $1, last_error = 'x'", NOW)
        assert (await migrations.apply_migrations(conn))[0] == "006_refresh_attempts"
        assert await migrations.apply_migrations(conn) == []
        (health,) = await token_health.load_accounts(conn)
        assert health.id == account and health.health.last_success_at == NOW


def test_the_token_summary_never_shows_a_success_beside_a_later_failure() -> None:
    connected = NOW - timedelta(days=20)
    # A run refreshed fine ten minutes ago; this check's refresh fails now.
    failing = TokenHealth(connected, NOW - timedelta(minutes=10)).after(
        AccountRefresh(2, NOW - timedelta(minutes=2), DEAD)
    )
    text = token_health.summary(failing, NOW)
    assert text == (
        "connected 20 days ago, refreshes failing since 2024-05-10 (2 min ago), last ok 10 min ago"
    )
    assert "just now" not in text and "last refresh ok" not in text
    # A record from before migration 006 (its last refresh read as the last success) that
    # claims a success after the streak began: the success is not shown.
    legacy = TokenHealth(connected, NOW, NOW - timedelta(days=2), DEAD)
    assert token_health.summary(legacy, NOW) == (
        "connected 20 days ago, refreshes failing since 2024-05-08 (2 days ago)"
    )
    never = TokenHealth(connected, None, NOW - timedelta(hours=3), DEAD)
    assert token_health.summary(never, NOW).endswith("(3 h ago), no successful refresh recorded")
    healthy = TokenHealth(connected, NOW - timedelta(minutes=30))
    assert token_health.summary(healthy, NOW) == "connected 20 days ago, last refresh ok 30 min ago"
