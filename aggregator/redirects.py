"""Redirects are refused, never followed: what the operator is told instead.

Every request carries a secret (Matomo's token in the form, the refresh token and client
secret in the token request, `Authorization: Bearer` to Search Console), and an HTTP client
that follows a 307/308 re-sends it to wherever the server points. So no request follows any
redirect, not even to its own origin: Google's APIs never redirect, and the usual Matomo
redirect (a proxy's http -> https on the same host) is fixed for good by configuring the URL
it points to. The refused redirect fails its batch, account or site with a message naming
only the target's scheme, host and port (its path or query may echo what was sent).
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def target_origin(request_url: str, location: str) -> str:
    """scheme://host[:port] of a redirect's target (a relative Location is the same origin)."""
    try:
        parts = urlsplit(urljoin(request_url, location))
        port = f":{parts.port}" if parts.port else ""
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    except ValueError:
        return "an unparseable address"
    if not (parts.scheme and host):
        return "an unparseable address"
    return f"{parts.scheme}://{host}{port}"


def refused_redirect(
    service: str, variable: str, request_url: str, status: int, location: str | None
) -> str:
    """One line: who redirected where, that nothing was sent there, and what to configure."""
    if not location:
        return (
            f"{service} answered HTTP {status}, a redirect without a target; redirects are "
            f"not followed: check {variable}"
        )
    return (
        f"{service} answered HTTP {status} redirecting to {target_origin(request_url, location)}; "
        f"redirects are not followed, so nothing was sent there: if that is the right server, "
        f"set {variable} to the address it redirects to"
    )
