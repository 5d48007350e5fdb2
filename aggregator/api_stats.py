"""How each source used its API during one run: the figures stored in `aggregator_runs.stats`.

The pipeline hands every source one SourceStats and stores it when the run ends; the source
counts its requests as it makes them. `status` derives the API error rate from these figures
(`failed_requests / requests`), so a request is counted where it is sent, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class SourceStats:
    """One source's figures for one run (the contract's `aggregator_runs.stats[source]`).

    - `requests`: HTTP requests sent to the source's API, retries included; for Search
      Console the token endpoint's requests too (a refresh is part of asking Google, and a
      dead token endpoint must show in the error rate), and a refused redirect counts as sent;
    - `retries`: requests that asked again for what an earlier, failed request asked;
    - `failed_requests`: requests answered with an error or no usable answer at all (a
      timeout, a network error, a refused redirect, an oversized answer, a refused refresh),
      and Matomo bulk requests answered with an error (or an unusable result) for some of
      their sites: one failed request each, however many of its sites failed, so that
      `failed_requests / requests` is a share of the requests sent;
    - `rate_limited`: of those, the answers that said "slow down" (429, rate-limit 403);
    - `sites_ok` / `sites_failed` / `sites_skipped`: how the source's sites ended;
    - `seconds`: how long the source ran.
    """

    requests: int = 0
    retries: int = 0
    failed_requests: int = 0
    rate_limited: int = 0
    sites_ok: int = 0
    sites_failed: int = 0
    sites_skipped: int = 0
    seconds: float = 0.0

    def sent(self, *, retry: bool) -> None:
        """Count one request as it goes out."""
        self.requests += 1
        self.retries += retry

    def failed(self, *, rate_limited: bool = False) -> None:
        """Count one request whose answer was an error or unusable."""
        self.failed_requests += 1
        self.rate_limited += rate_limited

    def as_json(self) -> dict[str, int | float]:
        figures = asdict(self)
        figures["seconds"] = round(self.seconds, 3)
        return figures
