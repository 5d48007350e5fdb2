"""Masking secrets out of any text that leaves the process: errors, logs, stored messages, output.

A secret can come back in many spellings: raw, URL-encoded by a server echoing a form or a
path (`quote` with or without `/` kept, `quote_plus`), JSON-escaped (ASCII or not), or
base64/base64url-encoded (padded or not) by a proxy echoing an `Authorization` header or a
whole request body. In base64 a secret's spelling depends on where it starts inside the
encoded data, so each of the three alignments is masked by the run of characters that only the
secret's bytes determine.

Every secret the process learns (settings at start-up, refresh tokens read from the database,
access tokens when Google issues them) is registered with `SECRETS`, the one redactor that logs
(`aggregator.logs`), stored errors (`aggregator.storage`) and command output go through. A
`Redactor` made for one purpose registers its secrets there too, so a secret once known is
masked everywhere.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

MASK = "***"
# Shorter values are not masked process-wide: "rt" would mangle every word containing it.
MIN_SECRET_CHARS = 4
# Base64 fragments shorter than this could match innocent text by chance.
_MIN_BASE64_FRAGMENT = 6


def spellings(secret: str) -> set[str]:
    """Every spelling of `secret` this module masks (fragments of base64 included)."""
    found = {
        secret,
        quote(secret),  # a URL path keeps its slashes
        quote(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    data = secret.encode()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode()
        found.update({whole, whole.rstrip("=")})
        found.update(f for f in _aligned_fragments(data, encode) if len(f) >= _MIN_BASE64_FRAGMENT)
    return {s for s in found if s}


def _aligned_fragments(data: bytes, encode) -> Iterator[str]:
    """For each of the 3 byte offsets at which `data` may start inside encoded bytes, the
    base64 characters that depend on `data` alone (6 bits each, none shared with neighbours)."""
    for shift in range(3):
        encoded = encode(b"\0" * shift + data).decode()
        first = math.ceil(8 * shift / 6)
        last = (8 * (shift + len(data))) // 6
        yield encoded[first:last]


class Redactor:
    """Replaces every secret it has been told about with ***, in every spelling it may take.

    APIs rarely echo tokens, but messages also carry exception text from libraries and proxies,
    so everything stored or logged goes through one of these as a last line of defence.

    Secrets arrive during a run (an access token per account), between log lines. Recompiling
    one pattern of every spelling after each would cost seconds over a few hundred accounts, so
    the spellings are kept in groups of doubling size (a binary counter: a new group merges
    with the one before while that is no larger), each compiled once: a run compiles
    O(n log n) characters, and masking scans at most log2(n) patterns.
    """

    def __init__(self, *secrets: str | None) -> None:
        self._spellings: set[str] = set()
        self._groups: list[tuple[list[str], re.Pattern[str]]] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if not secret:
            return
        group = sorted(spellings(secret) - self._spellings)
        if group:
            self._spellings.update(group)
            while self._groups and len(self._groups[-1][0]) <= len(group):
                group = self._groups.pop()[0] + group
            self._groups.append((group, _alternation(group)))
        if self is not SECRETS:
            register_secret(secret)

    def __call__(self, text: str) -> str:
        spans = sorted(m.span() for _, pattern in self._groups for m in pattern.finditer(text))
        if not spans:
            return text
        # Every character inside any match is masked, so overlapping secrets (one containing
        # another, or matched by different groups) are masked whole.
        pieces, shown_from, masked_to = [], 0, -1
        for start, end in spans:
            if start > masked_to:
                pieces.append(text[shown_from:start])
                pieces.append(MASK)
            masked_to = max(masked_to, end)
            shown_from = masked_to
        pieces.append(text[shown_from:])
        return "".join(pieces)


def _alternation(spellings: list[str]) -> re.Pattern[str]:
    # Longest first, so that within one pattern a secret containing another matches whole.
    return re.compile("|".join(map(re.escape, sorted(spellings, key=len, reverse=True))))


SECRETS = Redactor()


def register_secret(secret: str | None) -> None:
    """Mask `secret` (in every spelling) in everything the process logs, stores or prints."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        SECRETS.add(secret)


def redact(text: str) -> str:
    """`text` with every registered secret masked."""
    return SECRETS(text)


class MaskedStream:
    """A text stream that masks registered secrets in everything written through it.

    Commands print tables, JSON and summaries built from stored errors and API messages; this
    is the last net under all of them. Everything else (isatty, fileno, encoding) is the
    wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def masked_output() -> Iterator[None]:
    """sys.stdout and sys.stderr masked for the duration (restored afterwards)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskedStream(sys.stdout), MaskedStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
