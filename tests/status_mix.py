"""A realistic portfolio for `status` and the HTML report, seeded in a few set-based statements,
and the expected figures computed by SQL written independently of aggregator/status/ and
aggregator/status/html_data.py (its own due days, its own cell rules).

The mix, by site number n (today T in UTC, the test's AGGREGATOR_TIMEZONE):
- n % 97 == 0 inactive; n % 50 == 1 never deployed; n % 50 == 2 deployed today (new);
  n % 50 == 3 deployed 3 days ago with nothing stored (Matomo behind, Search Console new);
- n % 25 == 7 no Matomo; n % 30 == 8 no Search Console account;
- Matomo: visits every day (some zeros) but n % 20 == 5 stops 4 days ago (behind) and
  n % 20 == 6 has one gap 10 days ago;
- Search Console: final through T-4 (some zero days), busy sites (n % 3 == 0) provisional
  T-3..T-1, quiet ones nothing after T-4 (fresh: due is T-5); n % 20 == 9 stops at T-9 (behind);
- the last run failed Matomo for n % 100 == 11 and Search Console for n % 100 == 12 (one
  message per site naming its property) and n % 100 == 13 (one shared message).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg

MATOMO_DUE_LAG, GSC_DUE_LAG = 1, 5  # days before today, by the documented rule


async def seed_mix(conn: asyncpg.Connection, n_sites: int, today: date) -> None:
    accounts = [
        await conn.fetchval(
            "insert into gsc_accounts (email, refresh_token) values ($1, 'rt') returning id",
            f"team-{k}@mix.example",
        )
        for k in range(8)
    ]
    midday = datetime(today.year, today.month, today.day, 12, tzinfo=UTC)
    await conn.execute(
        """
        insert into sites (domain, is_active, deployed_at, matomo_site_id, gsc_account_id)
        select format('site%s.mix.example', n), n % 97 <> 0,
               case when n % 50 = 1 then null
                    when n % 50 = 2 then $2::timestamptz
                    when n % 50 = 3 then $2::timestamptz - interval '3 days'
                    else $2::timestamptz - interval '400 days' end,
               case when n % 25 = 7 then null else n end,
               case when n % 30 = 8 then null else ($3::bigint[])[1 + n % 8] end
        from generate_series(1, $1) n
        """,
        n_sites,
        midday,
        accounts,
    )
    await conn.execute(
        """
        with s as (
            select id, matomo_site_id, gsc_account_id,
                   split_part(split_part(domain, '.', 1), 'site', 2)::int as n,
                   (deployed_at at time zone 'UTC')::date as dep
            from sites where deployed_at is not null
        ), cells as (
            select s.*, d::date as day, $1::date - d::date as age
            from s, generate_series($1::date - 35, $1::date - 1, interval '1 day') d
            where d::date >= s.dep and s.n % 50 <> 3
        )
        insert into daily_analytics (site_id, date, matomo_visits, matomo_actions, gsc_clicks,
                                     gsc_impressions, gsc_final)
        select id, day, v, v, g, g * 10, f
        from (
            select id, day,
                   case when matomo_site_id is null or (n % 20 = 5 and age < 4)
                             or (n % 20 = 6 and age = 10) then null
                        else (n * 7 + age) % 40 end as v,
                   case when gsc_account_id is null or (n % 20 = 9 and age < 9) then null
                        when age >= 4 then (n + age) % 30
                        when n % 3 = 0 then 1 + (n + age) % 30 end as g,
                   case when gsc_account_id is null or (n % 20 = 9 and age < 9) then null
                        when age >= 4 then true
                        when n % 3 = 0 then false end as f
            from cells
        ) x
        where v is not null or g is not null
        """,
        today,
    )
    await conn.execute(
        """
        insert into aggregator_runs (started_at, finished_at, date_from, date_to, status,
                                     sites_total, rows_upserted, errors, stats)
        select $1::timestamptz - k * interval '1 day', $1::timestamptz - k * interval '1 day' + (100 + 3 * k) * interval '1 second',
               $2::date - 4 - k, $2::date - 1 - k,
               case when k % 7 = 0 then 'partial' else 'ok' end, 100, 1000 + k,
               case when k = 0 then (
                   select jsonb_agg(jsonb_build_object('site', domain, 'source', src, 'error', msg))
                   from (
                       select domain, 'matomo' as src, 'HTTP 500 from Matomo' as msg
                       from sites where split_part(split_part(domain, '.', 1), 'site', 2)::int % 100 = 11
                       union all
                       select domain, 'gsc', format('team cannot access sc-domain:%s', domain)
                       from sites where split_part(split_part(domain, '.', 1), 'site', 2)::int % 100 = 12
                       union all
                       select domain, 'gsc', 'invalid_grant: Token has been expired or revoked.'
                       from sites where split_part(split_part(domain, '.', 1), 'site', 2)::int % 100 = 13
                   ) e)
               else '[]'::jsonb end,
               jsonb_build_object(
                   'matomo', jsonb_build_object('requests', 100, 'failed_requests', k % 3),
                   'gsc', jsonb_build_object('requests', 1000, 'failed_requests', k % 5))
        from generate_series(0, 29) k
        """,
        datetime.now(UTC) - timedelta(hours=1),
        today,
    )


# Each (site, source) the status judges, with its newest day and whether the last run failed it.
_JUDGED = """
with m as (
    select s.id, s.domain, (s.deployed_at at time zone 'UTC')::date as dep,
           s.matomo_site_id is not null as hm, s.gsc_account_id is not null as hg
    from sites s where s.is_active and s.deployed_at is not null
), errs as (
    select e ->> 'site' as site, e ->> 'source' as source
    from (select errors from aggregator_runs order by started_at desc limit 1) r,
         jsonb_array_elements(r.errors) e
), judged as (
    select 'matomo' as source, m.id, m.domain, m.dep, $1::date - 1 as due,
           (select max(date) from daily_analytics d
            where d.site_id = m.id and d.matomo_visits is not null) as last
    from m where hm
    union all
    select 'gsc', m.id, m.domain, m.dep, $1::date - 5,
           (select max(date) from daily_analytics d
            where d.site_id = m.id and d.gsc_final is not null)
    from m where hg
)
select j.*, exists (select 1 from errs where errs.site = j.domain and errs.source = j.source)
           as failing
from judged j
"""


async def expected_states(conn: asyncpg.Connection, today: date) -> dict[str, dict[str, int]]:
    rows = await conn.fetch(
        f"""
        select source,
               count(*) filter (where failing) as failing,
               count(*) filter (where not failing and dep > due) as new,
               count(*) filter (where not failing and dep <= due
                                and (last is null or last < due)) as behind,
               count(*) filter (where not failing and dep <= due and last >= due) as fresh
        from ({_JUDGED}) x group by source
        """,
        today,
    )
    return {r["source"]: {k: r[k] for k in ("fresh", "behind", "failing", "new")} for r in rows}


async def expected_cells(conn: asyncpg.Connection, today: date) -> dict[str, dict[str, int]]:
    """Cells per state over the 30 days ending yesterday, by the documented cell rules."""
    rows = await conn.fetch(
        f"""
        select j.source,
               case when day < j.dep then 'before deployment'
                    when j.source = 'matomo' and d.matomo_visits > 0 then 'final'
                    when j.source = 'matomo' and d.matomo_visits = 0 then 'zero'
                    when j.source = 'gsc' and d.gsc_final = false then 'provisional'
                    when j.source = 'gsc' and d.gsc_final and d.gsc_impressions > 0 then 'final'
                    when j.source = 'gsc' and d.gsc_final then 'zero'
                    when j.failing then 'failed'
                    when day > j.due then 'not due yet'
                    else 'missing' end as state,
               count(*) as cells
        from ({_JUDGED}) j
        cross join generate_series($1::date - 30, $1::date - 1, interval '1 day') g
        cross join lateral (select g::date as day) dd
        left join daily_analytics d on d.site_id = j.id and d.date = dd.day
        group by 1, 2
        """,
        today,
    )
    found: dict[str, dict[str, int]] = {}
    for r in rows:
        found.setdefault(r["source"], {})[r["state"]] = r["cells"]
    return found
