"""Configuration from the environment (and an optional `.env`), validated once, up front.

Every setting is one row of `SETTINGS`: its variable, the `Settings` field it fills, its kind,
its default and, for numbers, the range it must fall in. Reading, validation, the error line
and the README's configuration table all come from that one table, so a new setting is one
row plus one `Settings` field (whose default is `default_of(...)` the row's). A typo fails the
run before any network or database work, with one line naming the variable and what it accepts
(exit 2), never a traceback and never a hang on an absurd value.
"""

from __future__ import annotations

import io
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from dotenv import dotenv_values
from dotenv.parser import parse_stream

# gsc_accounts.id is a bigint: an override names one as a plain whole number (no sign, no
# leading zero, so two spellings cannot name one account with two tokens).
_REFRESH_TOKEN_PREFIX = "GSC_REFRESH_TOKEN_"
_ACCOUNT_ID = re.compile(r"0|[1-9][0-9]*")
_MAX_ACCOUNT_ID = 2**63 - 1
_HOST_LABEL = re.compile(r"(?!-)[\w-]{1,63}(?<!-)")
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
_DECIMAL_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

Kind = Literal["dsn", "url", "secret", "text", "zone", "number", "count"]


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
class Setting:
    """One environment variable: what it fills, what it means, what it accepts.

    `kind` decides the parsing: `number` (finite float) and `count` (whole number) must lie in
    [`low`, `high`] and refuse a blank value; `url` is an http(s) URL with a well-formed host
    and port; `dsn` a postgres:// DSN; `secret`, `text` and `zone` are strings (blank = unset).
    """

    variable: str
    field: str
    kind: Kind
    meaning: str
    default: str | float | None = None
    low: float = 0.0
    high: float = 0.0
    unit: str = ""

    @property
    def allowed(self) -> str:
        """What the variable accepts, as the README's table and the error line say it."""
        if self.kind in ("number", "count"):
            what = "a number" if self.kind == "number" else "a whole number"
            unit = f" {self.unit}" if self.unit else ""
            return f"{what} from {_figure(self.low)} to {_figure(self.high)}{unit}"
        return {
            "dsn": "postgresql://USER:PASSWORD@HOST:PORT/DB (port 1..65535)",
            "url": "http(s)://HOST[:PORT][/PATH] (port 1..65535, no user:password@)",
            "zone": "an IANA time zone such as Europe/Berlin",
        }.get(self.kind, "any text")

    def read(self, env: Mapping[str, str]) -> object:
        """The validated value of this setting in `env`; raise ConfigError if it is invalid."""
        raw = env.get(self.variable)
        value = raw.strip() if raw is not None else ""
        if self.kind in ("number", "count"):
            if raw is None:
                return self.default
            return self._number(value)
        if not value:
            value = self.default if isinstance(self.default, str) else ""
            if not value:
                return None
        if self.kind == "dsn":
            _check_dsn(self.variable, value)
            return Secret(value)
        if self.kind == "url":
            _check_url(self.variable, value)
            return value.rstrip("/")
        if self.kind == "secret":
            return Secret(value)
        if self.kind == "zone":
            return self._zone(value)
        return value

    def _number(self, value: str) -> float | int:
        spelling = _WHOLE_NUMBER if self.kind == "count" else _DECIMAL_NUMBER
        # Only the plain ASCII spellings the table documents: int() and float() also take
        # Python's `1_000` and any script's digits (`٣`), which no operator means as a setting.
        try:
            if not spelling.fullmatch(value):
                raise ValueError(value)
            number: float | int = int(value) if self.kind == "count" else float(value)
        except ValueError:  # int() also refuses more than 4,300 digits
            number = math.nan
        # Compared as is (not through float()): a 400-digit whole number is out of range, not
        # an OverflowError; NaN fails every comparison.
        if not (self.low <= number <= self.high):
            raise ConfigError(f"{self.variable} must be {self.allowed}, got {value[:40]!r}")
        return number

    def _zone(self, value: str) -> ZoneInfo:
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            # Zone names are case-sensitive (`utc` is no zone, as `europe/berlin` is none):
            # a name that differs only in case is named, so the fix is in the line.
            spelt = {zone.lower(): zone for zone in available_timezones()}.get(value.lower())
            hint = f" (names are case-sensitive: {spelt})" if spelt else ""
            raise ConfigError(
                f"{self.variable} must be {self.allowed}, got {value[:40]!r}{hint}"
            ) from None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DATABASE_URL",
        "database_url",
        "dsn",
        "Postgres DSN: Supabase direct, session pooler (5432) or transaction pooler (6543); "
        "`?sslmode=require` is honoured",
    ),
    Setting("MATOMO_URL", "matomo_url", "url", "Matomo base URL (its `.../index.php` works too)"),
    Setting("MATOMO_TOKEN", "matomo_token", "secret", "Matomo `token_auth` (POST body only)"),
    Setting(
        "GOOGLE_CLIENT_ID", "google_client_id", "text", "the OAuth client of the refresh tokens"
    ),
    Setting("GOOGLE_CLIENT_SECRET", "google_client_secret", "secret", "that client's secret"),
    Setting(
        "GOOGLE_TOKEN_URL",
        "google_token_url",
        "url",
        "token endpoint",
        default="https://oauth2.googleapis.com/token",
    ),
    Setting(
        "GSC_API_URL",
        "gsc_api_url",
        "url",
        "Search Console API root",
        default="https://searchconsole.googleapis.com",
    ),
    Setting("AGGREGATOR_TIMEZONE", "timezone", "zone", 'zone of "yesterday"', default="UTC"),
    Setting(
        "GSC_MAX_QPS_PER_ACCOUNT",
        "gsc_max_qps_per_account",
        "number",
        "optional ceiling on Search Console queries/s per Google account (unset: the rate is "
        "learned from Google's answers)",
        low=0.01,
        high=1000,
        unit="queries/s",
    ),
    Setting(
        "GSC_MAX_QPS_PER_CLIENT",
        "gsc_max_qps_per_client",
        "number",
        "optional ceiling on Search Console queries/s per OAuth client, shared by all its "
        "accounts (unset: learned)",
        low=0.01,
        high=1000,
        unit="queries/s",
    ),
    Setting(
        "MATOMO_BATCH_SIZE",
        "matomo_batch_size",
        "count",
        "sites per Matomo bulk request",
        default=100,
        low=1,
        high=1000,
    ),
    Setting(
        "MATOMO_CONCURRENCY",
        "matomo_concurrency",
        "count",
        "Matomo requests in flight",
        default=4,
        low=1,
        high=64,
    ),
    Setting(
        "HTTP_CONNECT_TIMEOUT_SECONDS",
        "http_connect_timeout",
        "number",
        "connect timeout of every HTTP call",
        default=10.0,
        low=0.1,
        high=600,
        unit="seconds",
    ),
    Setting(
        "MATOMO_TIMEOUT_SECONDS",
        "matomo_timeout",
        "number",
        "total time of one Matomo request",
        default=180.0,
        low=0.1,
        high=3600,
        unit="seconds",
    ),
    Setting(
        "GSC_TIMEOUT_SECONDS",
        "gsc_timeout",
        "number",
        "total time of one Search Console or token request",
        default=60.0,
        low=0.1,
        high=3600,
        unit="seconds",
    ),
    Setting(
        "HTTP_MAX_ATTEMPTS",
        "http_max_attempts",
        "count",
        "attempts for a transient failure (timeouts, 5xx, 429)",
        default=5,
        low=1,
        high=20,
    ),
    Setting(
        "GSC_QUOTA_MAX_WAIT_SECONDS",
        "gsc_quota_max_wait",
        "number",
        "longest total back-off of one query on quota errors",
        default=120.0,
        low=1,
        high=3600,
        unit="seconds",
    ),
    Setting(
        "GSC_LOAD_QUOTA_PAUSE_SECONDS",
        "gsc_load_quota_pause",
        "number",
        "how long an account rests after Search Console's load quota refuses it, before it is "
        "tried once more (Google: wait 15 minutes)",
        default=900.0,
        low=0,
        high=3600,
        unit="seconds",
    ),
    Setting(
        "AGGREGATOR_DEADLINE_SECONDS",
        "run_deadline",
        "number",
        "the whole run's deadline; what was fetched is stored",
        default=3 * 3600.0,
        low=1,
        high=86400,
        unit="seconds",
    ),
    Setting(
        "AGGREGATOR_LOCK_WAIT_SECONDS",
        "lock_wait",
        "number",
        "how long a run waits for another run on the same database (0: try once); then exit 2",
        default=60.0,
        low=0,
        high=86400,
        unit="seconds",
    ),
    Setting(
        "AGGREGATOR_FLUSH_SECONDS",
        "flush_seconds",
        "number",
        "fetched rows are stored at least this often: the most a killed run may lose",
        default=30.0,
        low=0.05,
        high=3600,
        unit="seconds",
    ),
    Setting(
        "AGGREGATOR_FLUSH_ROWS",
        "flush_rows",
        "count",
        "rows held in memory before they are stored (memory is bounded by it)",
        default=20_000,
        low=1,
        high=1_000_000,
    ),
    Setting(
        "AGGREGATOR_LEASE_SECONDS",
        "lease_seconds",
        "number",
        "a run's lease on the database, renewed every third of it; a killed run's row is "
        "closed by the next run once it has run out",
        default=30.0,
        low=0.3,
        high=3600,
        unit="seconds",
    ),
    Setting(
        "AGGREGATOR_HEAL_DAYS",
        "heal_days",
        "count",
        "how far before yesterday the nightly window reaches back to heal a site's missing "
        "and provisional days",
        default=30,
        low=0,
        high=480,  # Search Console keeps 16 months: further back it has nothing to heal with
        unit="days",
    ),
)


def default_of(variable: str) -> Any:
    """The default of `variable` in SETTINGS, so `Settings` states each default only there."""
    return next(s.default for s in SETTINGS if s.variable == variable)


@dataclass(frozen=True)
class Settings:
    """Validated settings. Secrets are wrapped so that printing a Settings leaks nothing."""

    database_url: Secret | None = None
    matomo_url: str | None = None
    matomo_token: Secret | None = None
    google_client_id: str | None = None
    google_client_secret: Secret | None = None
    gsc_refresh_tokens: Mapping[int, Secret] = field(default_factory=dict)
    google_token_url: str = default_of("GOOGLE_TOKEN_URL")
    gsc_api_url: str = default_of("GSC_API_URL")
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    gsc_max_qps_per_account: float | None = default_of("GSC_MAX_QPS_PER_ACCOUNT")
    gsc_max_qps_per_client: float | None = default_of("GSC_MAX_QPS_PER_CLIENT")
    matomo_batch_size: int = default_of("MATOMO_BATCH_SIZE")
    matomo_concurrency: int = default_of("MATOMO_CONCURRENCY")
    http_connect_timeout: float = default_of("HTTP_CONNECT_TIMEOUT_SECONDS")
    matomo_timeout: float = default_of("MATOMO_TIMEOUT_SECONDS")
    gsc_timeout: float = default_of("GSC_TIMEOUT_SECONDS")
    http_max_attempts: int = default_of("HTTP_MAX_ATTEMPTS")
    gsc_quota_max_wait: float = default_of("GSC_QUOTA_MAX_WAIT_SECONDS")
    gsc_load_quota_pause: float = default_of("GSC_LOAD_QUOTA_PAUSE_SECONDS")
    run_deadline: float = default_of("AGGREGATOR_DEADLINE_SECONDS")
    lock_wait: float = default_of("AGGREGATOR_LOCK_WAIT_SECONDS")
    flush_seconds: float = default_of("AGGREGATOR_FLUSH_SECONDS")
    flush_rows: int = default_of("AGGREGATOR_FLUSH_ROWS")
    lease_seconds: float = default_of("AGGREGATOR_LEASE_SECONDS")
    heal_days: int = default_of("AGGREGATOR_HEAL_DAYS")

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
    """The process environment layered over `.env` (the real environment wins, as with dotenv).

    A line of `.env` that is not a setting fails with its file and line number, never its
    text: dotenv would skip it with a warning, and the setting it meant to carry (a token,
    say) would silently be missing. Comments, blank lines and `export NAME=value` are fine.
    """
    merged: dict[str, str] = {}
    if env_file is not None and env_file.exists() and not env_file.is_file():
        # Skipping it would run without the settings the operator meant it to hold.
        raise ConfigError(f"{env_file} is not a file (a directory?): remove it or make it a file")
    if env_file is not None and env_file.is_file():
        try:
            text = env_file.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:  # unreadable, or not UTF-8 (UnicodeDecodeError)
            raise ConfigError(
                f"cannot read {env_file} ({type(exc).__name__}): save it as UTF-8 text or remove it"
            ) from None
        for binding in parse_stream(io.StringIO(text)):
            if binding.error:
                raise ConfigError(
                    f"{env_file} line {binding.original.line} is not NAME=value (its text is "
                    "not shown: it may hold a secret): fix the quoting, or comment it out with #"
                )
        values = dotenv_values(stream=io.StringIO(text))
        merged.update({k: v for k, v in values.items() if v is not None})
    merged.update(os.environ)
    return merged


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate `env` into Settings; raise ConfigError with a one-line, secret-free message."""
    _refuse_misspelt_case(env)
    values = {setting.field: setting.read(env) for setting in SETTINGS}
    return Settings(gsc_refresh_tokens=refresh_token_overrides(env), **values)  # type: ignore[arg-type]


def _refuse_misspelt_case(env: Mapping[str, str]) -> None:
    """`matomo_token=...` is not MATOMO_TOKEN (names are case-sensitive): read as unset, the
    setting would be missing with nothing saying why. Beside the right spelling it is only
    noise another tool may have left in the environment, and is ignored."""
    known = {setting.variable for setting in SETTINGS}
    for name in env:
        if name not in known and name.upper() in known and name.upper() not in env:
            raise ConfigError(
                f"{name} is not read: variable names are case-sensitive, write {name.upper()}"
            )


def refresh_token_overrides(env: Mapping[str, str]) -> dict[int, Secret]:
    """GSC_REFRESH_TOKEN_<ACCOUNT_ID> by account id. A name that cannot be an account id
    (`GSC_REFRESH_TOKEN_abc`, a lower-case spelling) is refused: ignoring it would leave the
    account on its stored token, or none, with nothing saying why. A blank value is unset."""
    tokens: dict[int, Secret] = {}
    for name, value in env.items():
        if not name.upper().startswith(_REFRESH_TOKEN_PREFIX):
            continue
        suffix = name[len(_REFRESH_TOKEN_PREFIX) :]
        if (
            not name.startswith(_REFRESH_TOKEN_PREFIX)
            or not _ACCOUNT_ID.fullmatch(suffix)
            or int(suffix) > _MAX_ACCOUNT_ID
        ):
            raise ConfigError(
                f"{name[:60]} does not name an account: write GSC_REFRESH_TOKEN_<ACCOUNT_ID> "
                "with the account's gsc_accounts.id, e.g. GSC_REFRESH_TOKEN_3 "
                "(`aggregator accounts list` shows the ids)"
            )
        if value.strip():
            tokens[int(suffix)] = Secret(value.strip())
    return tokens


def configuration_table() -> list[str]:
    """The README's configuration table (Markdown lines), generated from SETTINGS.

    `python -m aggregator.config` prints it; a test keeps the README in step with it.
    """
    lines = ["| variable | meaning | default | allowed |", "| --- | --- | --- | --- |"]
    for setting in SETTINGS:
        default = "" if setting.default is None else f"`{_figure(setting.default)}`"
        lines.append(
            f"| `{setting.variable}` | {setting.meaning} | {default} | {setting.allowed} |"
        )
        if setting.variable == "GOOGLE_CLIENT_SECRET":
            lines.append(
                "| `GSC_REFRESH_TOKEN_<ACCOUNT_ID>` | overrides `gsc_accounts.refresh_token` "
                "for the account whose `gsc_accounts.id` is ACCOUNT_ID (another name is "
                "refused; an id no account has is a `check` warning) | | any text |"
            )
    return lines


def _figure(value: str | float) -> str:
    """A default or bound as an operator writes it: 60 rather than 60.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_url(variable: str, value: str) -> None:
    """An http(s) URL whose host and port a connection can use, and no credentials in it."""
    parts = _split(variable, value)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{variable} must be an http(s) URL: http(s)://HOST[:PORT][/PATH]")
    if "@" in parts.netloc:
        raise ConfigError(
            f"{variable} must not carry user:password@ (it would be printed and sent on)"
        )
    if "?" in value or "#" in value:
        # Never echoed: a pasted Matomo address may carry token_auth in its query.
        raise ConfigError(
            f"{variable} must not carry a ?query or #fragment (the job adds its own "
            "parameters; a token belongs in its own setting): http(s)://HOST[:PORT][/PATH]"
        )
    _check_host(variable, parts, required=True)


def _check_dsn(variable: str, value: str) -> None:
    """A postgres:// DSN whose every host (asyncpg accepts `h1:5432,h2:5433`) and port are usable.

    The DSN holds the database password, so no part of it is ever echoed.
    """
    example = "postgresql://postgres:PASSWORD@db.REF.supabase.co:5432/postgres"
    parts = _split(variable, value)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"{variable} must start with postgresql:// or postgres:// (for example {example})"
        )
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):
        # A DSN without a host (a Unix socket given as ?host=/path) is fine.
        _check_host(variable, _split(variable, f"//{host}"), required=False)


def _split(variable: str, value: str) -> SplitResult:
    try:
        return urlsplit(value)
    except ValueError:
        raise ConfigError(
            f"{variable} has a malformed host: an IPv6 address goes in brackets, as [2001:db8::1]"
        ) from None


def _check_host(variable: str, parts: SplitResult, *, required: bool) -> None:
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{variable} has a bad port: it must be a number from 1 to 65535")
    host = parts.hostname or ""
    if not host:
        if required:
            raise ConfigError(f"{variable} has no host: http(s)://HOST[:PORT][/PATH]")
        return
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ConfigError(
                f"{variable} has a malformed IPv6 host: write it as [2001:db8::1]"
            ) from None
        return
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ConfigError(
            f"{variable} has a malformed host: letters, digits, '-' and '.', "
            "or an IPv6 address in brackets"
        )


if __name__ == "__main__":
    print("\n".join(configuration_table()))
