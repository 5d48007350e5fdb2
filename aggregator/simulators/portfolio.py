"""A seeded, simulated portfolio: the same sites and accounts in Postgres and in the simulators.

The demo, the benchmark and the end-to-end tests all need a database whose `sites` and
`gsc_accounts` agree with what the Matomo and Google simulators serve; building both from one
pure description keeps them in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import asyncpg

from aggregator.model import SiteId
from aggregator.simulators.google import GoogleSimulator, SimAccount
from aggregator.simulators.matomo import MatomoSimulator

MATOMO_TOKEN = "demo-matomo-token"
CLIENT_ID = "demo-client.apps.googleusercontent.com"
CLIENT_SECRET = "demo-client-secret"


@dataclass(frozen=True, slots=True)
class SimSite:
    id: SiteId
    domain: str
    matomo_site_id: int | None
    gsc_account_id: int | None
    registered_property: str | None  # what the account sees in sites.list
    stored_property: str | None  # sites.gsc_property (None: the job derives it)


@dataclass(frozen=True, slots=True)
class SimGoogleAccount:
    id: int
    email: str
    refresh_token: str
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Portfolio:
    sites: tuple[SimSite, ...]
    accounts: tuple[SimGoogleAccount, ...]


def make_portfolio(
    n_sites: int, n_accounts: int, *, revoked_account: bool = False, unreachable_every: int = 0
) -> Portfolio:
    """A realistic mix: most sites on both sources; every 25th without Matomo, every 30th
    without Search Console; properties registered as domain, https:// and https://www. kinds,
    some stored explicitly. With `revoked_account` the last account's token is revoked; with
    `unreachable_every` N, every Nth site's property is only `siteUnverifiedUser`."""
    accounts = tuple(
        SimGoogleAccount(
            id=n,
            email=f"seo-team-{n}@demo.example",
            refresh_token=f"demo-refresh-token-{n}",
            revoked=revoked_account and n == n_accounts,
        )
        for n in range(1, n_accounts + 1)
    )
    sites = []
    for n in range(1, n_sites + 1):
        domain = f"site{n:05d}.example"
        registered = (f"sc-domain:{domain}", f"https://{domain}/", f"https://www.{domain}/")[n % 3]
        has_gsc = n % 30 != 0 and n_accounts > 0
        sites.append(
            SimSite(
                id=n,
                domain=domain,
                matomo_site_id=None if n % 25 == 0 else n,
                gsc_account_id=(n - 1) % n_accounts + 1 if has_gsc else None,
                registered_property=registered if has_gsc else None,
                stored_property=registered if has_gsc and n % 10 == 0 else None,
            )
        )
    if unreachable_every:
        sites = [
            _unreachable(site) if n % unreachable_every == 0 and site.gsc_account_id else site
            for n, site in enumerate(sites, start=1)
        ]
    return Portfolio(sites=tuple(sites), accounts=accounts)


def _unreachable(site: SimSite) -> SimSite:
    return SimSite(
        site.id,
        site.domain,
        site.matomo_site_id,
        site.gsc_account_id,
        registered_property=f"unverified:{site.registered_property}",
        stored_property=None,
    )


async def seed_portfolio(conn: asyncpg.Connection, portfolio: Portfolio) -> None:
    """Replace the monitored portfolio in the connection's schema (binary COPY: 10k sites fast)."""
    async with conn.transaction():
        await conn.execute("truncate daily_analytics, aggregator_runs, sites, gsc_accounts")
        await conn.copy_records_to_table(
            "gsc_accounts",
            records=[(a.id, a.email, a.refresh_token) for a in portfolio.accounts],
            columns=("id", "email", "refresh_token"),
        )
        await conn.copy_records_to_table(
            "sites",
            records=[
                (
                    s.id,
                    s.domain,
                    True,
                    date(2024, 1, 1),
                    s.matomo_site_id,
                    s.gsc_account_id,
                    s.stored_property,
                )
                for s in portfolio.sites
            ],
            columns=(
                "id",
                "domain",
                "is_active",
                "deployed_at",
                "matomo_site_id",
                "gsc_account_id",
                "gsc_property",
            ),
        )


def matomo_simulator(portfolio: Portfolio, *, seed: int = 1, **options) -> MatomoSimulator:
    sites = {s.matomo_site_id: "UTC" for s in portfolio.sites if s.matomo_site_id is not None}
    return MatomoSimulator(token=MATOMO_TOKEN, sites=sites, seed=seed, **options)


def google_simulator(portfolio: Portfolio, *, seed: int = 1, **options) -> GoogleSimulator:
    properties: dict[int, dict[str, str]] = {a.id: {} for a in portfolio.accounts}
    for site in portfolio.sites:
        if site.registered_property is None or site.gsc_account_id is None:
            continue
        if site.registered_property.startswith("unverified:"):
            prop = site.registered_property.removeprefix("unverified:")
            properties[site.gsc_account_id][prop] = "siteUnverifiedUser"
        else:
            properties[site.gsc_account_id][site.registered_property] = "siteOwner"
    accounts = {
        a.refresh_token: SimAccount(email=a.email, properties=properties[a.id], revoked=a.revoked)
        for a in portfolio.accounts
    }
    return GoogleSimulator(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, accounts=accounts, seed=seed, **options
    )
