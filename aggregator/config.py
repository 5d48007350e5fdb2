"""Configuration from the environment (and an optional `.env`), validated once, up front.

Everything the job needs is read here so that a typo fails the run before any network or
database work, with one line naming the variable to fix (exit 2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

DEFAULT_GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
DEFAULT_GSC_API_URL = "https://searchconsole.googleapis.com"
_REFRESH_TOKEN_VAR = re.compile(r"^GSC_REFRESH_TOKEN_(\d+)$")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable and how to fix it."""


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks.

    Call `.reveal()` only at the point where the value goes on the wire.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    """Validated settings. Secrets are wrapped so that printing a Settings leaks nothing."""

    database_url: Secret | None = None
    matomo_url: str | None = None
    matomo_token: Secret | None = None
    google_client_id: str | None = None
    google_client_secret: Secret | None = None
    gsc_refresh_tokens: Mapping[int, Secret] = field(default_factory=dict)
    google_token_url: str = DEFAULT_GOOGLE_TOKEN_URL
    gsc_api_url: str = DEFAULT_GSC_API_URL
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    # Defaults survive a new Cloud project's 60 queries/min: 1 query/s per OAuth client.
    gsc_max_qps_per_account: float = 10.0
    gsc_max_qps_per_client: float = 1.0
    matomo_batch_size: int = 100
    matomo_concurrency: int = 4
    http_connect_timeout: float = 10.0
    matomo_timeout: float = 180.0
    gsc_timeout: float = 60.0
    http_max_attempts: int = 5
    gsc_quota_max_wait: float = 120.0
    run_deadline: float = 3 * 3600.0
    lock_wait: float = 60.0

    @property
    def matomo_configured(self) -> bool:
        return bool(self.matomo_url and self.matomo_token)

    @property
    def gsc_configured(self) -> bool:
        return bool(self.google_client_id and self.google_client_secret)

    def require_database(self) -> str:
        if self.database_url is None:
            raise ConfigError("DATABASE_URL is not set: set it to your Postgres/Supabase DSN")
        return self.database_url.reveal()


def read_environment(env_file: Path | None = Path(".env")) -> dict[str, str]:
    """The process environment layered over `.env` (the real environment wins, as with dotenv)."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate `env` into Settings; raise ConfigError with a one-line, secret-free message."""
    get = _Reader(env)
    database_url = get.text("DATABASE_URL")
    if database_url is not None:
        _check_dsn(database_url)
    matomo_url = get.url("MATOMO_URL")
    tokens: dict[int, Secret] = {}
    for name, value in env.items():
        match = _REFRESH_TOKEN_VAR.match(name)
        if match and value.strip():
            tokens[int(match.group(1))] = Secret(value.strip())
    return Settings(
        database_url=Secret(database_url) if database_url else None,
        matomo_url=matomo_url.rstrip("/") if matomo_url else None,
        matomo_token=get.secret("MATOMO_TOKEN"),
        google_client_id=get.text("GOOGLE_CLIENT_ID"),
        google_client_secret=get.secret("GOOGLE_CLIENT_SECRET"),
        gsc_refresh_tokens=tokens,
        google_token_url=get.url("GOOGLE_TOKEN_URL") or DEFAULT_GOOGLE_TOKEN_URL,
        gsc_api_url=(get.url("GSC_API_URL") or DEFAULT_GSC_API_URL).rstrip("/"),
        timezone=get.zone("AGGREGATOR_TIMEZONE"),
        gsc_max_qps_per_account=get.positive("GSC_MAX_QPS_PER_ACCOUNT", 10.0),
        gsc_max_qps_per_client=get.positive("GSC_MAX_QPS_PER_CLIENT", 1.0),
        matomo_batch_size=int(get.positive("MATOMO_BATCH_SIZE", 100, integer=True)),
        matomo_concurrency=int(get.positive("MATOMO_CONCURRENCY", 4, integer=True)),
        http_connect_timeout=get.positive("HTTP_CONNECT_TIMEOUT_SECONDS", 10.0),
        matomo_timeout=get.positive("MATOMO_TIMEOUT_SECONDS", 180.0),
        gsc_timeout=get.positive("GSC_TIMEOUT_SECONDS", 60.0),
        http_max_attempts=int(get.positive("HTTP_MAX_ATTEMPTS", 5, integer=True)),
        gsc_quota_max_wait=get.positive("GSC_QUOTA_MAX_WAIT_SECONDS", 120.0),
        run_deadline=get.positive("AGGREGATOR_DEADLINE_SECONDS", 3 * 3600.0),
        lock_wait=get.positive("AGGREGATOR_LOCK_WAIT_SECONDS", 60.0),
    )


def _check_dsn(dsn: str) -> None:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            "DATABASE_URL must start with postgresql:// or postgres:// "
            "(for example postgresql://postgres:PASSWORD@db.REF.supabase.co:5432/postgres)"
        )


class _Reader:
    """Typed getters over the environment; blank values count as unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def secret(self, name: str) -> Secret | None:
        value = self.text(name)
        return Secret(value) if value else None

    def url(self, name: str) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{name} must be an http(s) URL, got {_shown(value)!r}")
        return value

    def zone(self, name: str) -> ZoneInfo:
        value = self.text(name) or "UTC"
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{name}={value!r} is not an IANA time zone (for example Europe/Berlin)"
            ) from None

    def positive(self, name: str, default: float, *, integer: bool = False) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise ConfigError(f"{name} must be {kind} greater than 0, got {value!r}") from None
        if not number > 0 or number == float("inf"):
            raise ConfigError(f"{name} must be greater than 0, got {value!r}")
        return number


def _shown(url: str) -> str:
    """A URL safe to echo: user info and query string (which may carry a token) removed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else url[:40]
