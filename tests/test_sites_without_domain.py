"""A Management Hub's `sites` may hold a monitored site without a domain (NULL or blank): the
contract's `domain text unique` is not a constraint `migrate` adds to a table it adopts. Such a
site is named by its id everywhere, so `run`, `status` and `check` work and say which site."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from aggregator.simulators import portfolio as world
from tests.factories import seed
from tests.test_check import cli
from tests.test_signals import job_environment, run_job_process

NAMELESS = ("site 1 without a domain", "site 2 without a domain")


async def test_monitored_sites_without_a_domain_are_named_by_their_id(
    empty_db: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("create table sites (id bigint primary key, domain text)")
    finally:
        await conn.close()
    env_db = {"DATABASE_URL": empty_db}
    assert (await cli("migrate", env=env_db))[0] == 0
    portfolio = await seed(empty_db, world.make_portfolio(3, 1))
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("update sites set domain = null where id = 1")
        await conn.execute("update sites set domain = '  ' where id = 2")
    finally:
        await conn.close()
    async with (
        world.matomo_simulator(portfolio) as matomo,
        world.google_simulator(portfolio) as google,
    ):
        env = job_environment(empty_db, matomo.url, google.url)
        run = await run_job_process(env, tmp_path, "--lookback", "1")
        status_code, status_out, status_err = await cli("status", env=env)
        check_code, check_out, check_err = await cli("check", env=env)

    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert all(name in run.stdout for name in NAMELESS), run.stdout
    conn = await asyncpg.connect(empty_db)
    try:
        matomo_sites = await conn.fetchval(
            "select count(distinct site_id) from daily_analytics where matomo_visits is not null"
        )
    finally:
        await conn.close()
    assert matomo_sites == 3  # Matomo needs no domain: every site's days are stored
    assert status_code == 1 and status_err == "", status_err
    assert all(name in status_out for name in NAMELESS) and "<site>G" not in status_out
    assert check_code == 1 and check_err == "", check_err
    assert all(name in check_out for name in NAMELESS), check_out
