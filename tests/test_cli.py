"""The command line as cron and operators use it: real processes, real exit codes."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import arguments
from aggregator.cli import COMMANDS
from aggregator.simulators import portfolio as world
from aggregator.status import verdict
from tests.factories import add_site, seed
from tests.test_signals import job_environment

ROOT = Path(__file__).resolve().parent.parent


def aggregator(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout_closed: bool = False,
):
    """The CLI in a real process; `stdout_closed`: as `aggregator ... >&-` (no stdout read)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MATOMO_", "GOOGLE_", "GSC_"))}
    base.pop("DATABASE_URL", None)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args],
        stdout=None if stdout_closed else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=base,
        cwd=cwd or ROOT,
        timeout=60,
        preexec_fn=(lambda: os.close(1)) if stdout_closed else None,
    )


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run", "--from", "2024-02-30", "--to", "2024-03-01"],
            "--from '2024-02-30' is not a date",
        ),
        (["run", "--from", "2024-03-02", "--to", "2024-03-01"], "is after --to"),
        (["run", "--date", "2999-01-01"], "in the future"),
        (["run", "--lookback", "x"], "invalid int value"),
        (["run", "--source", "ga4"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["run", "--date", "2024-03-01", "--date", "2024-03-02"], "--date: given more than once"),
        (["run", "--from", "2024-03-01", "--from", "2024-02-01"], "--from: given more than once"),
        (["run", "--to", "2024-03-01", "--to", "2024-03-02"], "--to: given more than once"),
        (["--lookback", "2", "--lookback", "30"], "--lookback: given more than once"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, expected) -> None:
    env = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}
    assert expected in one_line_error(aggregator(*args, env=env, cwd=tmp_path))


def test_missing_database_url(tmp_path) -> None:
    assert "DATABASE_URL is not set" in one_line_error(aggregator("run", cwd=tmp_path))


def test_bad_setting_from_env_file(tmp_path) -> None:
    (tmp_path / ".env").write_text("GSC_MAX_QPS_PER_CLIENT=lots\n")
    assert "GSC_MAX_QPS_PER_CLIENT" in one_line_error(aggregator("run", cwd=tmp_path))


def test_unreachable_database_hides_the_password(tmp_path) -> None:
    env = {"DATABASE_URL": "postgresql://postgres:s3cr3t-pw@127.0.0.1:1/db"}
    line = one_line_error(aggregator("run", env=env, cwd=tmp_path))
    assert "cannot connect to database at 127.0.0.1:1/db" in line
    assert "s3cr3t-pw" not in line


def test_schema_missing_says_to_migrate(empty_db, tmp_path) -> None:
    line = one_line_error(
        aggregator("--lookback", "2", env={"DATABASE_URL": empty_db}, cwd=tmp_path)
    )
    assert "run `aggregator migrate`" in line


@pytest.mark.parametrize(
    "column", ["sites.gsc_property", "daily_analytics.gsc_final", "aggregator_runs.stats"]
)
async def test_a_column_dropped_after_migrating_is_one_line_not_a_crash(
    db, conn, tmp_path, column
) -> None:
    """Its migration is recorded, yet `migrate` adds the column back: the line says so, and
    after it the commands work again."""
    table, _, name = column.partition(".")
    await add_site(conn, "example.com")
    await conn.execute(f"alter table {table} drop column {name}")
    env = {"DATABASE_URL": db}
    commands = (["run", "--lookback", "1"], ["run", "--dry-run"], ["status"])
    for command in commands:
        line = one_line_error(aggregator(*command, env=env, cwd=tmp_path))
        assert line.endswith(
            f"database has no column {column}: run `aggregator migrate`: it adds the column back"
        )
    assert await conn.fetchval("select count(*) from aggregator_runs") == 0
    migrated = aggregator("migrate", env=env, cwd=tmp_path)
    assert migrated.stdout.startswith(f"added back {column} to "), migrated.stderr
    assert aggregator("status", env=env, cwd=tmp_path).returncode == 0  # its site has no source


async def test_a_timezone_the_database_does_not_know_is_one_line(db, conn, tmp_path) -> None:
    """AGGREGATOR_TIMEZONE that Python knows and Postgres does not (time zone data of another
    age on either side; here a zone file only this machine has): each command that counts
    days in the database stops with one line naming the setting, exit 2, no run row; `check`
    reports it as a problem; commands that count no days there are unaffected."""
    zones = tmp_path / "zoneinfo"
    (zones / "America").mkdir(parents=True)
    shutil.copy(Path("/usr/share/zoneinfo/America/Santiago"), zones / "America" / "Newer_Zone")
    await add_site(conn, "example.com")
    env = {
        "DATABASE_URL": db,
        "AGGREGATOR_TIMEZONE": "America/Newer_Zone",
        "PYTHONTZPATH": f"{zones}{os.pathsep}/usr/share/zoneinfo",
    }
    for command in (
        ["run", "--lookback", "1"],
        ["run", "--dry-run"],
        ["status"],
        ["status", "--json"],
        ["status", "--html", str(tmp_path / "report.html")],
    ):
        line = one_line_error(aggregator(*command, env=env, cwd=tmp_path))
        assert line.startswith(
            "aggregator: error: AGGREGATOR_TIMEZONE America/Newer_Zone: the database does not "
            "know this time zone"
        ), command
        assert "fix: set AGGREGATOR_TIMEZONE to a zone" in line
    assert await conn.fetchval("select count(*) from aggregator_runs") == 0
    check = aggregator("check", env=env, cwd=tmp_path)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "PROBLEM  AGGREGATOR_TIMEZONE  database  AGGREGATOR_TIMEZONE America/Newer_Zone" in (
        check.stdout
    )
    assert aggregator("accounts", "list", env=env, cwd=tmp_path).returncode == 0


def test_migrate_and_check_with_stdout_closed_exit_with_their_outcome(empty_db, tmp_path) -> None:
    """`migrate >&-` migrates and exits 0, `check >&-` exits with its verdict, as `run` and
    `status` do: nobody reads their report, but the work is done (not 141, nothing on stderr)."""
    env = {"DATABASE_URL": empty_db}
    outcomes = {}
    for args in (["check"], ["migrate"], ["check"], ["check", "--json"]):
        result = aggregator(*args, env=env, cwd=tmp_path, stdout_closed=True)
        outcomes.setdefault(" ".join(args), []).append((result.returncode, result.stderr))
    # check before migrate: no schema, a problem (1); migrate: done (0); then all is well (0).
    assert outcomes == {
        "check": [(1, ""), (0, "")],
        "migrate": [(0, "")],
        "check --json": [(0, "")],
    }
    up_to_date = aggregator("migrate", env=env, cwd=tmp_path)
    assert up_to_date.stdout.startswith("schema of ") and "is up to date" in up_to_date.stdout


async def test_migrate_then_dry_run(empty_db, tmp_path) -> None:
    env = {"DATABASE_URL": empty_db}
    first = aggregator("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0 and "applied 001_schema" in first.stdout
    again = aggregator("migrate", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    run = aggregator("run", "--dry-run", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("site")
    assert "ok: 0 sites" in run.stdout


async def test_unconfigured_matomo_is_reported_when_sites_need_it(db, conn, tmp_path) -> None:
    await add_site(conn, "example.com", matomo_site_id=1)
    line = one_line_error(aggregator("run", env={"DATABASE_URL": db}, cwd=tmp_path))
    assert "MATOMO_URL and MATOMO_TOKEN must be set" in line


def test_help_lists_every_run_flag() -> None:
    result = aggregator("run", "--help")
    assert result.returncode == 0
    for flag in (
        "--from",
        "--to",
        "--date",
        "--lookback",
        "--site",
        "--source",
        "--dry-run",
        "--gsc-final-only",
    ):
        assert flag in result.stdout


def test_run_help_says_what_an_open_window_and_today_mean() -> None:
    page = " ".join(aggregator("run", "--help").stdout.split())
    assert "first day; without --to, up to yesterday" in page
    assert "a single day; today is allowed: its numbers so far" in page


@pytest.mark.parametrize("command", ["run", "migrate", "status", "check", "demo"])
def test_every_command_takes_verbose(command) -> None:
    parsed = arguments.build_parser().parse_args([command, "-v"])
    assert parsed.verbose is True


# Modules of other commands: the nightly run must not pay for importing them.
OTHER_COMMANDS = (
    "aggregator.simulators",
    "aggregator.status",
    "aggregator.check",
    "aggregator.accounts",
    "aggregator.demo",
)
HELP_PAGES = (
    (),
    ("run",),
    ("migrate",),
    ("status",),
    ("check",),
    ("accounts",),
    ("accounts", "list"),
    ("accounts", "add"),
    ("accounts", "deactivate"),
    ("demo",),
)


async def imported_by(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, set[str]]:
    """Run the CLI in a fresh interpreter (without blocking this event loop, where simulators
    may serve it); its exit code and every module it imported."""
    script = (
        "import json, sys\n"
        "from aggregator.cli import main\n"
        "try:\n"
        f"    code = main({args!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "print(json.dumps([code, sorted(sys.modules)]), file=sys.stderr)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MATOMO_", "GOOGLE_"))}
    base.pop("DATABASE_URL", None)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **env, "PYTHONPATH": str(ROOT)},
        cwd=cwd,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    code, modules = json.loads(err.decode().strip().splitlines()[-1])
    return code, set(modules)


async def test_run_imports_no_other_commands_module(db, tmp_path) -> None:
    """A dry run through both real sources (simulated servers) imports them and the pipeline,
    and no module of another command."""
    portfolio = await seed(db, world.make_portfolio(4, 2))
    async with (
        world.matomo_simulator(portfolio) as matomo,
        world.google_simulator(portfolio) as google,
    ):
        env = job_environment(db, matomo.url, google.url)
        code, modules = await imported_by(["run", "--dry-run", "--lookback", "2"], env, tmp_path)
        assert matomo.requests >= 1 and google.query_requests >= 1  # it did fetch
    assert code == 0
    assert {"aggregator.pipeline", "aggregator.matomo", "aggregator.search_console.client"} <= (
        modules
    )
    assert not {m for m in modules if m.startswith(OTHER_COMMANDS)}


@pytest.mark.parametrize("command", HELP_PAGES, ids=lambda c: " ".join(c) or "aggregator")
async def test_every_help_page_is_complete_and_imports_no_command(command, tmp_path) -> None:
    code, modules = await imported_by([*command, "--help"], {}, tmp_path)
    assert code == 0
    assert not {m for m in modules if m.startswith(OTHER_COMMANDS)}
    # Not even the job's own machinery or the network and database libraries.
    assert not modules & {"aggregator.pipeline", "aggregator.storage", "asyncpg", "aiohttp"}
    page = aggregator(*command, "--help", cwd=tmp_path).stdout
    if command:  # a command's page: what it does, how to call it, what its exit codes mean
        assert "examples:\n  aggregator " in page
        assert "exit status:\n  0 " in page
    else:
        assert all(name in page for name in COMMANDS)


def test_run_help_describes_the_self_healing_window() -> None:
    page = " ".join(aggregator("run", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert (
        "With no dates given, each site and source gets its own window: the last --lookback "
        "days (default 4) ending yesterday, widened back over that site's own missing days and "
        "(Search Console) provisional days, no further than AGGREGATOR_HEAL_DAYS (default 30) "
        "before yesterday and never before its deployment." in page
    )
    assert "provisional days still" not in page and "reaching back further" not in page
    assert (
        "each date is then a calendar day of its source: Matomo's in the site's own Matomo "
        "timezone, Search Console's in Pacific time." in page
    )


def test_help_figures_are_the_commands_own() -> None:
    assert arguments.STATUS_WINDOW_DAYS == verdict.WINDOW_DAYS
