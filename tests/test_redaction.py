"""One redaction for everything: every spelling of every secret, in every output channel.

The oracle here does not use the module's own list of spellings: it looks for the secret raw,
URL- and JSON-encoded, and decodes every run of base64 characters at every offset, in both
alphabets, looking for the secret's bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, quote, quote_plus

import pytest
import structlog
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import redaction
from aggregator.logs import configure_logging, reset_logging
from aggregator.redaction import Redactor, redact, register_secret
from aggregator.simulators import GoogleSimulator, SimServer
from tests.test_secrets import (
    REVOKED_REFRESH_TOKEN,
    SECRETS,
    WINDOW,
    _env,
    _google,
    _table_text,
    run_job_process,
    secret_world,  # noqa: F401 (a fixture)
)

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]+")


def revealed(text: str, secret: str) -> bool:
    """Whether `text` still gives `secret` away in any spelling this project promises to mask."""
    if any(s in text for s in (secret, quote(secret), quote(secret, safe=""), quote_plus(secret))):
        return True
    if any(json.dumps(secret, ensure_ascii=a)[1:-1] in text for a in (True, False)):
        return True
    wanted = secret.encode()
    for run in _BASE64_RUN.findall(text):
        standard = run.replace("-", "+").replace("_", "/")
        for offset in range(4):
            chunk = standard[offset:]
            chunk = chunk[: len(chunk) - 1] if len(chunk) % 4 == 1 else chunk
            if wanted in base64.b64decode(chunk + "=" * (-len(chunk) % 4)):
                return True
    return False


secrets = st.text(st.characters(blacklist_categories=("Cs",)), min_size=6, max_size=48)
surroundings = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
context_bytes = st.binary(max_size=5)


def encodings(secret: str, before: bytes, after: bytes) -> list[str]:
    """The secret as an echoing server, proxy or library might write it back."""
    data = before + secret.encode() + after
    bearer = f"Bearer {secret}".encode()
    spelled = [
        secret,
        quote(secret),
        quote(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret),
        json.dumps({"echo": secret}, ensure_ascii=False),
        json.dumps({"echo": f"token_auth={quote_plus(secret)}"}),
    ]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for raw in (secret.encode(), data, bearer, b"user:" + secret.encode()):
            encoded = encode(raw).decode()
            spelled += [encoded, encoded.rstrip("=")]
    return spelled


# No per-example deadline: on a loaded CI machine a slow example is not a wrong one.
@settings(deadline=None)
@given(secret=secrets, before=context_bytes, after=context_bytes, left=surroundings)
def test_every_spelling_of_a_secret_is_masked(
    secret: str, before: bytes, after: bytes, left: str
) -> None:
    redactor = Redactor(secret)
    for spelled in encodings(secret, before, after):
        text = f"{left}{spelled} and again {spelled}."
        assert revealed(text, secret), "the oracle must see the unmasked secret"
        assert not revealed(redactor(text), secret), spelled


@settings(deadline=None)
@given(first=secrets, second=secrets)
def test_every_secret_of_several_is_masked(first: str, second: str) -> None:
    redactor = Redactor(first, second)
    text = f"{first} {base64.b64encode(second.encode()).decode()} {quote_plus(first)}"
    masked = redactor(text)
    assert not revealed(masked, first) and not revealed(masked, second)


def test_secrets_learned_one_by_one_between_calls_are_all_masked() -> None:
    redactor = Redactor()
    tokens = [f"ya29.token-{i:04d}-learned-during-the-run" for i in range(300)]
    for token in tokens:
        redactor.add(token)
        assert redactor(f"echo {token}") == "echo ***"
    text = " ".join(tokens[::7]) + " " + base64.b64encode(tokens[0].encode()).decode()
    assert not any(revealed(redactor(text), token) for token in tokens)
    # A secret containing another is masked whole, whichever was learned first.
    redactor.add("ya29.token-0000-learned-during-the-run-and-more")
    assert redactor("x ya29.token-0000-learned-during-the-run-and-more y") == "x *** y"


def test_a_redactor_for_one_purpose_registers_its_secrets_for_everything() -> None:
    token = "ya29.access-token-learned-at-run-time"
    Redactor().add(token)
    header = base64.b64encode(f"Bearer {token}".encode()).decode()
    assert redact(f"echoed Authorization: {header}").count("***") == 1
    register_secret("rt")  # too short to mask process-wide: it would mangle every word
    assert redact("start") == "start"


def test_a_librarys_standard_log_line_is_one_json_line_with_secrets_masked() -> None:
    secret = "pg/S3CRET+pass=word"
    token = "ya29.S3CRET-access"
    out = io.StringIO()
    configure_logging(secrets=[secret], stream=out)
    register_secret(token)  # learned after logging was configured
    try:
        raise ConnectionResetError(f"connection to postgresql://u:{quote(secret, safe='')}@h lost")
    except ConnectionResetError:
        logging.getLogger("asyncpg.pool").exception(
            "pool connection lost (%s)", base64.b64encode(f"Bearer {token}".encode()).decode()
        )
    logging.getLogger("aiohttp.client").info("chatter below the library threshold")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"careful with {secret}", stacklevel=1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert first["logger"] == "asyncpg.pool" and first["level"] == "error"
    assert "ConnectionResetError" in first["exception"]
    assert second["logger"] == "py.warnings"
    for text in lines:
        assert not revealed(text, secret) and not revealed(text, token), text


def test_a_crash_is_one_masked_json_line(capsys) -> None:
    configure_logging(secrets=["S3CRET-crash-value"], stream=sys.stderr)
    try:
        raise RuntimeError("boom S3CRET-crash-value")
    except RuntimeError as error:
        sys.excepthook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "S3CRET" not in err
    assert json.loads(err)["event"] == "aggregator.crashed"


def test_an_unraisable_exception_is_one_masked_json_line(capsys) -> None:
    configure_logging(secrets=["S3CRET-finalizer-value"], stream=sys.stderr)

    class Leaky:
        def __del__(self) -> None:
            raise ConnectionError("finalizer lost S3CRET-finalizer-value")

    Leaky()  # collected at once: its __del__ raises where nothing can catch it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "S3CRET" not in err, err
    assert json.loads(err)["event"] == "aggregator.unraisable"


def test_printed_output_is_masked() -> None:
    register_secret("mtok/S3CRET+matomo=1a")
    out = io.StringIO()
    stream = redaction.MaskedStream(out)
    print(json.dumps({"error": base64.b64encode(b"xmtok/S3CRET+matomo=1a").decode()}), file=stream)
    assert not revealed(out.getvalue(), "mtok/S3CRET+matomo=1a")
    assert stream.isatty() is False


# --- End to end: servers echoing secrets base64-encoded, through the real command line -------


def _both_base64(raw: bytes) -> str:
    return f"{base64.b64encode(raw).decode()} {base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


class Base64EchoingMatomo(SimServer):
    """A Matomo whose errors quote the whole request body base64-encoded (token included)."""

    def build_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_route("*", "/index.php", self._echo)
        return app

    async def _echo(self, request: web.Request) -> web.Response:
        raw = await request.read()
        message = f"cannot decode request {_both_base64(raw)}"
        subrequests = [k for k in parse_qs(raw.decode()) if k.startswith("urls[")]
        if not subrequests:
            return web.json_response({"result": "error", "message": message})
        return web.json_response([{"result": "error", "message": message}] * len(subrequests))


class Base64EchoingGoogle(GoogleSimulator):
    """Refused token requests and every query quote what they were sent, base64-encoded."""

    access_tokens: ClassVar[list[str]] = []

    async def _token(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if REVOKED_REFRESH_TOKEN in parse_qs(raw.decode()).get("refresh_token", []):
            body = {"error": "invalid_grant", "error_description": _both_base64(raw)}
            return web.json_response(body, status=400)
        return await super()._token(request)

    async def _query(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        self.access_tokens.append(header.removeprefix("Bearer "))
        message = f"User does not have sufficient permission ({_both_base64(header.encode())})"
        return web.json_response(
            {"error": {"code": 403, "message": message, "errors": [{"reason": "forbidden"}]}},
            status=403,
        )


async def test_secrets_echoed_base64_reach_no_output_or_table(
    secret_world,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
):
    w = secret_world
    google = _google(w.portfolio, Base64EchoingGoogle)
    outputs: dict[str, str] = {}
    async with Base64EchoingMatomo() as matomo, google:
        env = _env(w, matomo.url, google.url)
        run = await run_job_process(env, tmp_path, *WINDOW)
        outputs["run"] = run.stdout + run.stderr
        assert run.returncode == 1, run.stderr[-2000:]
        for args in (("check",), ("check", "--json"), ("status", "--json")):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aggregator",
                *args,
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            outputs[" ".join(args)] = out.decode() + err.decode()
    tokens = [t for t in Base64EchoingGoogle.access_tokens if t]
    assert tokens, "Search Console was asked with an access token"
    tables = await _table_text(w.db, w.schema)
    assert "cannot decode request" in tables and "sufficient permission" in tables
    assert "cannot decode request" in outputs["check"]
    for name, text in {**outputs, "tables": tables}.items():
        leaked = [s for s in (*SECRETS, *tokens) if revealed(text, s)]
        assert not leaked, f"{name} reveals {leaked}:\n{text[-3000:]}"


# --- Tracebacks never render local variables ------------------------------------------------

_LOCAL_VALUE = "S3CRET-held-only-by-a-local"
_CRASHING_STATUS = f"""
import sys
import aggregator.status.command


def command(args, settings):
    batch_of_rows = [("example.com", "2026-01-01", 17)] * 3
    held_secret = {_LOCAL_VALUE!r}
    raise RuntimeError("a bug no handler expects")


aggregator.status.command.command = command
from aggregator.cli import main

sys.exit(main(["status"]))
"""


def _crash_output(db: str, *, terminal: bool) -> tuple[int, str]:
    """A real process whose command fails with a bug; its stderr a terminal or a pipe."""
    env = {**os.environ, "DATABASE_URL": db, "PYTHONPATH": str(Path(__file__).parent.parent)}
    if not terminal:
        process = subprocess.run(
            [sys.executable, "-c", _CRASHING_STATUS], capture_output=True, env=env, timeout=60
        )
        return process.returncode, process.stderr.decode()
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-c", _CRASHING_STATUS],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env=env,
    ) as process:
        os.close(follower)
        chunks = []
        with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
            while chunk := os.read(leader, 65536):
                chunks.append(chunk)
        os.close(leader)
    return process.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "cron"])
def test_an_unexpected_exception_shows_no_local_variables(db, terminal: bool) -> None:
    """A bug escaping a command prints its traceback (in a terminal: structlog's console
    renderer, whose default rich traceback would list every frame's locals), but never the
    values of its locals: a batch of rows, or a secret no one registered for masking."""
    code, err = _crash_output(db, terminal=terminal)
    assert code == 1, err
    assert "RuntimeError: a bug no handler expects" in err
    assert "aggregator.crashed" in err
    for local in ("batch_of_rows", "held_secret", "example.com", _LOCAL_VALUE):
        assert local not in err, err


def test_a_logger_after_reset_logging_shows_no_local_variables(capsys) -> None:
    """What reset_logging leaves (structlog's defaults, for the tests and any process that
    runs the CLI more than once) renders a traceback without locals too."""
    reset_logging()
    held = [_LOCAL_VALUE]
    try:
        raise RuntimeError("a bug beside a secret in a local")
    except RuntimeError:
        structlog.get_logger().exception("unconfigured")
    out = capsys.readouterr().out
    assert held and "RuntimeError: a bug beside a secret in a local" in out
    assert _LOCAL_VALUE not in out, out
