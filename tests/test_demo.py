"""`aggregator demo` as a new user runs it: a real process, simulators, a real Postgres."""

import shutil
import tempfile
from pathlib import Path

import asyncpg

from tests.test_cli import aggregator


async def test_demo_on_database_url_isolates_a_revoked_account(server_dsn, tmp_path) -> None:
    try:
        result = aggregator(
            "demo",
            "--sites",
            "30",
            "--accounts",
            "3",
            "--revoked-account",
            "--report",
            str(tmp_path / "demo.html"),
            env={"DATABASE_URL": server_dsn},
            cwd=tmp_path,
        )
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        out = result.stdout
        assert "schema aggregator_demo" in out
        assert "Matomo bulk requests       1" in out
        assert "seo-team-3@demo.example" in out and "reconnect" in out
        assert "partial:" in out
        # It ends with what `aggregator status` says, and its HTML report.
        assert "aggregator status" in out and "ATTENTION" in out
        assert out.rstrip().endswith(str(tmp_path / "demo.html"))
        assert "seo-team-3@demo.example" in (tmp_path / "demo.html").read_text()
        conn = await asyncpg.connect(server_dsn)
        try:
            stored = await conn.fetchval(
                "select count(distinct site_id) from aggregator_demo.daily_analytics"
            )
            public = await conn.fetchval("select to_regclass('public.daily_analytics')")
        finally:
            await conn.close()
        assert stored == 30
        assert public is None  # the demo never touches the operator's own tables
    finally:
        conn = await asyncpg.connect(server_dsn)
        await conn.execute("drop schema if exists aggregator_demo cascade")
        await conn.close()


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
        again = aggregator("demo", "--sites", "12", "--accounts", "2", env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "RuntimeDirWarning" not in first.stderr + again.stderr
    finally:
        shutil.rmtree(data, ignore_errors=True)
