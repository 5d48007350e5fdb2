"""`aggregator demo` as a new user runs it: a real process, simulators, a real Postgres."""

import asyncio
import shlex
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from aggregator import dates, demo
from aggregator.arguments import build_parser
from aggregator.config import Secret, Settings
from tests.conftest import fresh_database
from tests.test_cli import aggregator

STATUS_AGAIN = f"{sys.executable} -m aggregator demo --status"


@pytest.fixture
async def own_database(server_dsn: str) -> AsyncIterator[str]:
    """The demo always uses the schema aggregator_demo: in a database of its own, no other
    test or run can meet it there."""
    async with fresh_database(server_dsn) as dsn:
        yield dsn


async def test_demo_on_database_url_isolates_a_revoked_account(own_database, tmp_path) -> None:
    env = {"DATABASE_URL": own_database}
    result = aggregator(
        "demo",
        "--sites",
        "30",
        "--accounts",
        "3",
        "--revoked-account",
        "--report",
        str(tmp_path / "demo.html"),
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "schema aggregator_demo" in out
    assert "Matomo bulk requests       1" in out
    assert "seo-team-3@demo.example" in out and "reconnect" in out
    assert "partial:" in out
    # It ends with what `aggregator status` says, how to see it again, and its HTML report.
    assert "aggregator status" in out and "ATTENTION" in out
    assert STATUS_AGAIN in out
    assert out.rstrip().endswith(str(tmp_path / "demo.html"))
    assert "seo-team-3@demo.example" in (tmp_path / "demo.html").read_text()
    conn = await asyncpg.connect(own_database)
    try:
        stored = await conn.fetchval(
            "select count(distinct site_id) from aggregator_demo.daily_analytics"
        )
        public = await conn.fetchval("select to_regclass('public.daily_analytics')")
    finally:
        await conn.close()
    assert stored == 30
    assert public is None  # the demo never touches the operator's own tables
    again = aggregator("demo", "--status", env=env, cwd=tmp_path)
    assert again.returncode == 1, again.stderr  # the revoked account's sites are failing
    assert "(UTC): ATTENTION" in again.stdout and "invalid_grant" in again.stdout


async def test_demo_status_without_demo_data_is_one_line(own_database, tmp_path) -> None:
    result = aggregator("demo", "--status", env={"DATABASE_URL": own_database}, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(
        "no demo data in schema aggregator_demo: run `aggregator demo` first"
    )


def test_demo_without_database_url_uses_an_embedded_postgres(tmp_path) -> None:
    # Outside pytest's private temp tree: the embedded server drops root to its own user.
    data = Path(tempfile.mkdtemp(prefix="aggregator-demo-test-"))
    try:
        env = {"XDG_DATA_HOME": str(data)}
        first = aggregator("demo", "--sites", "12", "--accounts", "2", env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert "embedded PostgreSQL" in first.stdout and "ok: " in first.stdout
        assert (data / "aggregator" / "pgdata" / "PG_VERSION").is_file()
        # A clean run leaves every site fresh (provisional Search Console numbers count).
        assert "(UTC): all fresh" in first.stdout
        report = data / "aggregator" / "demo-report.html"
        assert first.stdout.rstrip().endswith(str(report)) and report.stat().st_size > 0
        # The command the demo prints, exactly as printed, shows `status` on its data: exit 0.
        assert STATUS_AGAIN in first.stdout
        status = aggregator(*shlex.split(STATUS_AGAIN)[3:], env=env, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "(UTC): all fresh" in status.stdout and "embedded PostgreSQL" in status.stdout
        again = aggregator("demo", "--sites", "12", "--accounts", "2", env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "RuntimeDirWarning" not in first.stderr + again.stderr + status.stderr
    finally:
        shutil.rmtree(data, ignore_errors=True)


class _LateEvening(datetime):
    """The clock at 23:30 UTC yesterday: already today in Kiritimati (UTC+14)."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:
        midnight = datetime.combine(datetime.now(UTC).date(), time(), tzinfo=UTC)
        late = midnight - timedelta(minutes=30)
        return late.astimezone(tz) if tz is not None else late.replace(tzinfo=None)


async def test_demo_and_its_status_agree_on_today_near_midnight(
    own_database, tmp_path, monkeypatch, capsys
) -> None:
    """At 23:30 UTC it is already tomorrow in AGGREGATOR_TIMEZONE=Pacific/Kiritimati: the demo
    run and `demo --status` both count days there, so the data the demo just stored is fresh
    for its status, not a day behind."""
    monkeypatch.setattr(dates, "datetime", _LateEvening)
    monkeypatch.setattr(demo, "datetime", _LateEvening)
    settings = Settings(database_url=Secret(own_database), timezone=ZoneInfo("Pacific/Kiritimati"))
    report = str(tmp_path / "demo.html")
    shown = []
    for extra in ([], ["--status"]):
        args = build_parser().parse_args(
            ["demo", "--sites", "12", "--accounts", "2", "--report", report, *extra]
        )
        code = await asyncio.to_thread(demo.command, args, settings)
        shown.append((code, capsys.readouterr().out))

    (run_code, run_out), (status_code, status_out) = shown
    assert status_code == 0, status_out
    assert "(Pacific/Kiritimati): all fresh" in status_out
    # The run's own summary of its status says the same.
    assert run_code == 0, run_out
    assert "(Pacific/Kiritimati): all fresh" in run_out
