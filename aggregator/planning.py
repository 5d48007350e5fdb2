"""Tonight's work per source: which sites, each over its own window, least recently served first.

Pure rules over what storage.site_histories read: a site's gaps and provisional days widen only
its own window (never another site's), no window reaches before the site's deployment, and the
order puts the sites a source served longest ago first, so a run cut by its deadline does not
starve the same sites night after night.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from aggregator.dates import SpansWindows, Window, site_window
from aggregator.model import GscAccount, Site, SiteError, SiteHistory, SiteId

_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SourcePlan(SpansWindows):
    """One source's share of a run: its sites in serving order and each site's own window."""

    sites: list[Site]
    windows: dict[SiteId, Window]


def plan_source(
    source: str,
    sites: Sequence[Site],
    histories: Mapping[SiteId, SiteHistory],
    window: Window,
) -> SourcePlan | None:
    """`source`'s sites with their windows; None when no site has a day to fetch.

    A default (not explicit) window heals: it reaches back over the site's own oldest day that
    `source` has no value for (or, for Search Console, still provisional). Every window is
    clipped to the site's deployment day, explicit ranges included.
    """
    chosen: list[tuple[datetime, Site]] = []
    windows: dict[SiteId, Window] = {}
    for site in sites:
        history = histories.get(site.id)
        if history is None:  # deleted or undeployed since the sites were read
            continue
        heal_from = None if window.explicit else _heal_from(history, source)
        own = site_window(window, history.deployed_on, heal_from)
        if own is None:
            continue
        windows[site.id] = own
        chosen.append((_served_at(history, source) or _NEVER, site))
    if not chosen:
        return None
    # sorted() is stable: sites served at the same moment keep the order they were read in.
    ordered = [site for _, site in sorted(chosen, key=lambda pair: pair[0])]
    return SourcePlan(ordered, windows)


def skipped_gsc_sites(sites: Sequence[Site], accounts: Mapping[int, GscAccount]) -> list[SiteError]:
    """A SiteError for each site whose Google account is missing or inactive: it is not
    fetched, so the run must say so (and is then not `ok`) rather than skip it silently."""
    return [
        SiteError(
            site.domain,
            "gsc",
            f"Google account id {site.gsc_account_id} is not active in gsc_accounts: "
            "activate it or assign the site to an active account",
            skipped=True,
        )
        for site in sites
        if site.gsc_account_id is not None and site.gsc_account_id not in accounts
    ]


def _heal_from(history: SiteHistory, source: str) -> date | None:
    return history.matomo_heal_from if source == "matomo" else history.gsc_heal_from


def _served_at(history: SiteHistory, source: str) -> datetime | None:
    return history.matomo_served_at if source == "matomo" else history.gsc_served_at
