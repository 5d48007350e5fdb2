"""`aggregator accounts`: tokens are never shown, consent is stored, the OAuth library is optional."""

import asyncio
import base64
import json
import sys
import types

import pytest

from aggregator import accounts, cli
from aggregator.accounts import Grant
from aggregator.config import ConfigError, load_settings
from aggregator.pipeline import UsageError
from aggregator.redaction import redact
from aggregator.storage import StorageError
from tests.factories import add_account, add_site
from tests.test_cli import aggregator, one_line_error

CLIENT = {
    "GOOGLE_CLIENT_ID": "client-123.apps.googleusercontent.com",
    "GOOGLE_CLIENT_SECRET": "cs-SEKRIT",
}


async def test_list_shows_token_source_never_the_token(db, conn, tmp_path) -> None:
    stored = await add_account(conn, "stored@example.com", "rt-TABLE-SEKRIT-4711")
    overridden = await add_account(conn, "env@example.com", "rt-SHADOWED-SEKRIT")
    await add_account(conn, "none@example.com", active=False)
    await conn.execute(
        "update gsc_accounts set last_error = 'invalid_grant: reconnect' where id = $1", stored
    )
    await add_site(conn, "a.com", gsc_account_id=stored)
    env = {"DATABASE_URL": db, f"GSC_REFRESH_TOKEN_{overridden}": "rt-ENV-SEKRIT-0815"}

    result = aggregator("accounts", "list", env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for secret in ("rt-TABLE-SEKRIT-4711", "rt-SHADOWED-SEKRIT", "rt-ENV-SEKRIT-0815", "SEKRIT"):
        assert secret not in result.stdout + result.stderr
    rows = {line.split()[1]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["stored@example.com"][2:5] == ["yes", "table", "1"]
    assert rows["env@example.com"][2:5] == ["yes", "env", "0"]
    assert rows["none@example.com"][2:5] == ["no", "missing", "0"]
    assert "invalid_grant: reconnect" in result.stdout
    assert "connected" in result.stdout.splitlines()[0]


async def test_add_stores_the_consented_token_and_reactivates(db, conn, capsys) -> None:
    settings = load_settings({"DATABASE_URL": db, **CLIENT})
    existing = await add_account(conn, "Owner@Example.com", "rt-old", active=False)
    await conn.execute(
        "update gsc_accounts set last_error = 'invalid_grant' where id = $1", existing
    )

    def consent() -> Grant:
        return Grant("rt-new-SEKRIT", "OWNER@example.com")

    code = await asyncio.to_thread(accounts.add, settings, "owner@example.com", consent)
    second = Grant("rt-2", "second@example.com")
    await asyncio.to_thread(accounts.add, settings, "second@example.com", lambda: second)

    assert code == 0
    rows = await conn.fetch(
        "select id, email, refresh_token, is_active, last_error from gsc_accounts order by id"
    )
    assert [dict(r) for r in rows] == [
        {"id": existing, "email": "Owner@Example.com", "refresh_token": "rt-new-SEKRIT",
         "is_active": True, "last_error": None},
        {"id": existing + 1, "email": "second@example.com", "refresh_token": "rt-2",
         "is_active": True, "last_error": None},
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert f"updated owner@example.com (account {existing})" in out
    assert "added second@example.com" in out
    assert "rt-new-SEKRIT" not in out
    assert redact("echoed rt-new-SEKRIT") == "echoed ***", "the new token is masked from now on"
    assert '"In production"' in out and "expire after 7 days" in out
    health = await conn.fetch("select connected_at, failing_since from gsc_accounts")
    assert all(r["connected_at"] is not None and r["failing_since"] is None for r in health)


@pytest.mark.parametrize(
    ("signed_in", "refusal"),
    [
        ("someone-else@example.com", "signed in as someone-else@example.com, not owner@"),
        (None, "Google did not say which account signed in"),
    ],
)
async def test_add_refuses_a_token_of_another_account_and_stores_nothing(
    db, conn, signed_in, refusal
) -> None:
    settings = load_settings({"DATABASE_URL": db, **CLIENT})
    await add_account(conn, "owner@example.com", "rt-old")
    before = [dict(r) for r in await conn.fetch("select * from gsc_accounts order by id")]

    def consent() -> Grant:
        return Grant("rt-WRONG-ACCOUNT", signed_in)

    with pytest.raises(UsageError, match=refusal):
        await asyncio.to_thread(accounts.add, settings, "owner@example.com", consent)
    with pytest.raises(UsageError):
        await asyncio.to_thread(accounts.add, settings, "new@example.com", consent)
    after = [dict(r) for r in await conn.fetch("select * from gsc_accounts order by id")]
    assert after == before  # no token stored, no account created


def test_signed_in_email_reads_the_id_tokens_email_claim() -> None:
    def encoded(part: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")

    token = ".".join(
        [encoded({"alg": "RS256", "typ": "JWT"}), encoded({"email": "a@example.com"}), "c2ln"]
    )
    assert accounts.signed_in_email(token) == "a@example.com"
    assert accounts.signed_in_email(None) is None
    assert accounts.signed_in_email("not-a-jwt") is None


async def test_add_checks_the_database_before_asking_for_consent(empty_db) -> None:
    settings = load_settings({"DATABASE_URL": empty_db, **CLIENT})
    asked = []
    with pytest.raises(StorageError, match="run `aggregator migrate`"):
        await asyncio.to_thread(accounts.add, settings, "x@example.com", lambda: asked.append(1))
    assert asked == []


def test_add_without_the_oauth_library_is_one_line_exit_2(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    monkeypatch.setitem(sys.modules, "google_auth_oauthlib", None)

    assert cli.main(["accounts", "add", "owner@example.com"]) == 2

    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"aggregator: error: {accounts.MISSING_LIBRARY}"]


def test_consent_runs_the_loopback_flow_with_the_jobs_client(monkeypatch) -> None:
    calls = {}

    class FakeFlow:
        oauth2session = types.SimpleNamespace(max_redirects=30)  # requests' default

        @classmethod
        def from_client_config(cls, config, scopes):
            calls["config"], calls["scopes"] = config, scopes
            return cls()

        def run_local_server(self, **kwargs):
            calls["run"] = kwargs
            return types.SimpleNamespace(refresh_token="rt-granted", id_token=None)

    module = types.ModuleType("google_auth_oauthlib.flow")
    module.InstalledAppFlow = FakeFlow
    monkeypatch.setitem(
        sys.modules, "google_auth_oauthlib", types.ModuleType("google_auth_oauthlib")
    )
    monkeypatch.setitem(sys.modules, "google_auth_oauthlib.flow", module)
    settings = load_settings({**CLIENT, "GOOGLE_TOKEN_URL": "http://127.0.0.1:9/token"})

    consent = accounts.installed_app_consent(settings, None, open_browser=False)

    assert consent() == Grant("rt-granted", None)
    assert calls["scopes"] == [
        "https://www.googleapis.com/auth/webmasters.readonly",
        "openid",
        "https://www.googleapis.com/auth/userinfo.email",
    ]
    assert calls["run"] == {"port": 0, "open_browser": False, "prompt": "consent"}
    assert FakeFlow.oauth2session.max_redirects == 0, "the token exchange follows no redirect"
    assert calls["config"] == {
        "installed": {
            "client_id": CLIENT["GOOGLE_CLIENT_ID"],
            "client_secret": CLIENT["GOOGLE_CLIENT_SECRET"],
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "http://127.0.0.1:9/token",
            "redirect_uris": ["http://localhost"],
        }
    }


def test_client_secrets_must_belong_to_the_jobs_client(tmp_path) -> None:
    secrets = tmp_path / "client.json"
    secrets.write_text(json.dumps({"installed": {"client_id": "other.apps", "client_secret": "x"}}))
    with pytest.raises(ConfigError, match="another OAuth client"):
        accounts.client_config(load_settings(CLIENT), secrets)
    assert (
        accounts.client_config(load_settings({}), secrets)["installed"]["client_id"] == "other.apps"
    )
    with pytest.raises(ConfigError, match="GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET"):
        accounts.client_config(load_settings({}), None)


async def test_deactivate(db, conn, tmp_path) -> None:
    account = await add_account(conn, "owner@example.com", "rt")
    await add_site(conn, "a.com", gsc_account_id=account)
    env = {"DATABASE_URL": db}

    result = aggregator("accounts", "deactivate", "OWNER@example.com", env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "1 monitored sites still use it" in result.stdout
    assert await conn.fetchval("select is_active from gsc_accounts where id = $1", account) is False
    unknown = aggregator("accounts", "deactivate", "nobody@example.com", env=env, cwd=tmp_path)
    assert "no Google account nobody@example.com" in one_line_error(unknown)
