"""The query rate Google allows, learned from its answers: one Throttle per Google account and
one per OAuth client (the Cloud project's quota, shared by its accounts).

Google publishes 1,200 queries/min per user and 40,000/min per project, grants new projects
60/min, and other tools may eat into an account's quota, so the real limit is unknown. A
Throttle starts safely (the rate learned last night, else a ceiling the operator set, else
START_RATE) and, until Google first refuses, grows sixteenfold a second while its rate is in
use and Google answers (from a rate learned without a refusal too: that was only the fastest
Google was asked for). Sixteen, not two or four: at one query a second a slower start spends
most of a small portfolio's night finding the quota, and a refusal costs little, since the
first one stops the growth and holds the scope until Google's counting window has drained
(`resume_at`), so the overshoot is not followed by a run of refusals.

On a 429 or a rate-limit 403 it takes the rate Google accepted just before as the limit: it
drops to CUT of that and then settles at SETTLE of it, close under the limit instead of
oscillating far below. Refusals within COOLDOWN of a cut belong to the overload already cut
for. After PROBE_AFTER calm seconds at its target it raises its estimate by PROBE_STEP, and by
twice the step after each probe that held, so a quota that grew (or a neighbour that stopped
eating it) is found again within a minute; only a limit that then held PROBE_AFTER seconds
counts as learned. What it learned is stored by the
pipeline and is where the next run starts.

The operator's ceiling (GSC_MAX_QPS_*) is a rate they vouch for: a lone refusal there (none
other within PROBE_AFTER) is taken for jitter (arrivals bunched on the way, so that a
per-second count sees one query more than was sent in any second): the scope holds until the
window has drained and keeps its rate. A second refusal within PROBE_AFTER is no jitter (the
quota sits under the ceiling, or a neighbour eats it: either refuses again at once) and cuts
as any other, so a ceiling set too high costs one refusal more. Cutting for each lone one cost
the hand-tuned `make bench` row about a third of a second per refusal, and the night ends with
its slowest account.

Pure apart from the clock, which the caller passes in (the event loop's monotonic time).
"""

from __future__ import annotations

import bisect
import math

from aggregator.model import LearnedRate

START_RATE_DEFAULT = 1.0  # queries/s with nothing learned: a new Cloud project's 60/min
START_RATE = START_RATE_DEFAULT  # module-level, read at call time: tests start faster
MIN_RATE = 0.05  # never slower than one query in 20 s: the night must go on
MAX_RATE = 1000.0  # the most GSC_MAX_QPS_* allows; with no ceiling set, the only cap
CUT = 0.85
SETTLE = 0.95
COOLDOWN = 1.0
PROBE_AFTER = 5.0
PROBE_STEP = 1.05
QUOTA_WINDOW = 1.0  # seconds over which Google counts queries per second
_REACHED = 0.99  # a rate this close to its target has reached it
_BUSY_SHARE = 0.5  # a rate counts as in use when this share of it is being sent
_SLOW_START_GROWTH = 16.0  # per second, until Google first refuses (see above)


class Throttle:
    """One scope's (an account's or the OAuth client's) learned query rate."""

    def __init__(self, start: LearnedRate | None, ceiling: float | None) -> None:
        """`start`: the rate an earlier run learned (None: nothing learned)."""
        self.ceiling = min(ceiling, MAX_RATE) if ceiling else MAX_RATE
        begin = start.queries_per_second if start else None
        # With nothing learned, a ceiling the operator set is a rate they vouch for.
        self.rate = self.start = _clamp(begin or ceiling or START_RATE, self.ceiling)
        # A rate learned under a refusal is SETTLE of a limit Google showed: start from that
        # limit, probing above it only after PROBE_AFTER calm seconds, instead of rediscovering
        # it by force. One learned without a refusal is only a floor: grow from it.
        self.limit: float | None = begin / SETTLE if start and start.limit_shown else None
        # The highest limit that held: shown by Google, or probed and then PROBE_AFTER calm.
        self.held_limit = self.limit
        self.peak = 0.0  # the highest rate Google accepted
        self.refusals = 0
        # Send times, sorted (answers come back out of order), of the last window or so.
        self._sent: list[float] = []
        self._accepted: list[float] = []
        self._grown_at: float | None = None
        self._first_sent = -math.inf
        self._cut_at = -math.inf
        self._refused_at = -math.inf
        self.resume_at = -math.inf  # after a refusal, when the quota's window has drained
        self._calm_since: float | None = None
        self._probe_step = PROBE_STEP

    def window(self) -> float:
        """Seconds over which rates are measured: one, or three queries' worth."""
        return max(1.0, 3.0 / self.rate)

    def sent(self, now: float) -> None:
        """Note a query sent now. Growth is measured from the first: at one query a second,
        waiting for a second answer to start growing would lose a second."""
        _note(self._sent, now, self.window())
        if self._grown_at is None:
            self._grown_at = self._first_sent = now

    def answered(self, now: float, sent_at: float) -> None:
        """Google answered a query sent at `sent_at`: grow while the rate is in use and under
        the estimate."""
        window = self.window()
        _note(self._accepted, sent_at, window)
        self.peak = max(self.peak, _count(self._accepted, sent_at, window) / window)
        # Since the first query only: at a start of one query a second, a window of three
        # seconds would call the rate unused until the third query.
        span = min(window, max(now - self._first_sent, 1 / self.rate))
        in_use = _count(self._sent, now, window) / span
        if self._calm_since is None:
            self._calm_since = now
        last, self._grown_at = self._grown_at, now
        if last is None or in_use < _BUSY_SHARE * self.rate:
            return
        elapsed = min(now - last, 1.0)
        if self.limit is None:
            self.rate = _clamp(self.rate * _SLOW_START_GROWTH**elapsed, self.ceiling)
            return
        target = SETTLE * self.limit
        # Probe only a limit this run has used: one held under the ceiling proves nothing.
        if now - self._calm_since >= PROBE_AFTER and self.rate >= _REACHED * target:
            self.held_limit = self.limit
            self.limit *= self._probe_step
            # Each probe that held doubles the next step: a quota that grew tenfold (or a
            # limit learned on a bad night) is found again in a minute, not in an hour.
            self._probe_step = 1 + 2 * (self._probe_step - 1)
            self._calm_since = now
            target = SETTLE * self.limit
        if self.rate < target:
            self.rate = _clamp(
                min(target, self.rate + (target - self.rate) * elapsed), self.ceiling
            )

    def refused(self, now: float, sent_at: float) -> None:
        """Google refused a query sent at `sent_at`: the limit is about the rate it accepted
        over the window before that (counted by send time, as Google counts arrivals); cut
        under it, unless this belongs to the overload already cut for or is a lone refusal at
        the operator's ceiling (then only hold until the window has drained)."""
        self.refusals += 1
        lone = now - self._refused_at >= PROBE_AFTER
        self._refused_at = self._calm_since = now
        if now - self._cut_at < COOLDOWN:
            return
        window = self.window()
        counted = _within(self._accepted, sent_at, window)
        # Google counts the queries it accepted over a trailing window: until the oldest of
        # those leaves it, whatever is sent is refused as well.
        recent = [at for at in counted if at > sent_at - QUOTA_WINDOW]
        self.resume_at = min(recent) + QUOTA_WINDOW if recent else now
        if lone and self.ceiling < MAX_RATE and self.rate >= _REACHED * self.ceiling:
            return  # jitter at the operator's ceiling (see above): hold, keep the rate
        self._cut_at = now
        # A slow start overshoots, or the operator's ceiling did not hold (refused twice): what
        # Google accepted over the window says where it stopped, one less than counted (send
        # times are taken a little before the query is on the wire). Refused at a limit it
        # held: that rate is the limit for now. A refusal from jitter (arrivals bunched on the
        # way) costs SETTLE, not a tenth; a quota that really shrank (a neighbour eating it)
        # refuses again, lower each time, until it fits.
        estimate = (len(counted) - 1) / window if self.limit is None else self.rate
        # Refused at a rate well under the estimate (a per-minute quota filling up, a neighbour
        # eating the quota): the current rate is what was too fast.
        estimate = max(min(estimate, self.rate), MIN_RATE)
        self.limit = estimate if self.limit is None else min(self.limit, estimate)
        self._probe_step = PROBE_STEP
        self.held_limit = (
            self.limit if self.held_limit is None else min(self.held_limit, self.limit)
        )
        self.rate = _clamp(CUT * estimate, self.ceiling)

    def learned(self) -> LearnedRate | None:
        """The rate the next run starts at: SETTLE of the limit Google showed (by a refusal,
        or an earlier run's), else the highest rate it accepted, a floor to grow from; None
        when this run learned nothing about Google because the operator's ceiling held it.

        Never clamped to this run's ceiling: a ceiling is the operator's choice for one run
        (GSC_MAX_QPS_* set for a night), not Google's limit, and stored as one it would slow
        every later run that has no ceiling."""
        if self.held_limit is not None:
            return LearnedRate(_clamp(SETTLE * self.held_limit, MAX_RATE), limit_shown=True)
        if self.ceiling < MAX_RATE and self.rate >= self.ceiling:
            return None
        return LearnedRate(_clamp(max(self.peak, self.start), MAX_RATE), limit_shown=False)


def _note(times: list[float], at: float, window: float) -> None:
    """Insert `at` in order and forget the times a window older than the newest: the counts
    are taken once per answer, and a sorted list keeps each a bisection, where a scan of the
    OAuth client's hundreds of recent queries per answer cost a tenth of a 10,000-site run."""
    bisect.insort(times, at)
    stale = bisect.bisect_right(times, times[-1] - window)
    if stale:
        del times[:stale]


def _within(times: list[float], end: float, window: float) -> list[float]:
    """The times in (end - window, end]."""
    return times[bisect.bisect_right(times, end - window) : bisect.bisect_right(times, end)]


def _count(times: list[float], end: float, window: float) -> int:
    """How many of `times` fall in (end - window, end]."""
    return bisect.bisect_right(times, end) - bisect.bisect_right(times, end - window)


def _clamp(rate: float, ceiling: float) -> float:
    return max(MIN_RATE, min(rate, ceiling))
