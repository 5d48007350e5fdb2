"""Masking secrets out of any text that leaves the process: errors, logs, stored messages."""

from __future__ import annotations

from urllib.parse import quote, quote_plus


class Redactor:
    """Replaces every secret it has been told about with ***, in every spelling it may take.

    APIs rarely echo tokens, but messages also carry exception text from libraries and proxies,
    so everything stored or logged goes through one of these as a last line of defence.
    """

    def __init__(self, *secrets: str | None) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret:
            # An endpoint that echoes the request form echoes it URL-encoded ("1//0g" is
            # "1%2F%2F0g" there), so those spellings are secrets too.
            self._secrets.update({secret, quote(secret, safe=""), quote_plus(secret)})

    def __call__(self, text: str) -> str:
        # Longest first, so a secret containing another is replaced whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text
