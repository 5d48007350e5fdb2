import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import cli
from aggregator.config import (
    SETTINGS,
    ConfigError,
    Secret,
    Setting,
    Settings,
    configuration_table,
    load_settings,
    read_environment,
)
from aggregator.search_console import rates


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a real process in `cwd` (its .env), none of the job's variables inherited."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MATOMO_", "GOOGLE_", "GSC_", "AGGREGATOR_", "HTTP_", "DATABASE_"))
    }
    env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/none"
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=30,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("aggregator: error: ")
    return result.stderr.strip()


def test_defaults_survive_a_new_cloud_projects_quota() -> None:
    settings = load_settings({})
    # No ceiling by default: the rate is learned, starting at a new Cloud project's 60/min.
    assert settings.gsc_max_qps_per_client is None and settings.gsc_max_qps_per_account is None
    assert rates.START_RATE_DEFAULT * 60 <= 60
    assert settings.google_token_url == "https://oauth2.googleapis.com/token"
    assert settings.gsc_api_url == "https://searchconsole.googleapis.com"
    assert str(settings.timezone) == "UTC"
    assert not settings.matomo_configured and not settings.gsc_configured


def test_refresh_token_overrides_are_read_per_account() -> None:
    settings = load_settings(
        {"GSC_REFRESH_TOKEN_7": "1//rt-seven", "GSC_REFRESH_TOKEN_8": "  ", "OTHER": "x"}
    )
    assert settings.gsc_refresh_tokens == {7: Secret("1//rt-seven")}  # blank: unset


@pytest.mark.parametrize(
    "name",
    [
        "GSC_REFRESH_TOKEN_abc",
        "GSC_REFRESH_TOKEN_",
        "GSC_REFRESH_TOKEN_-3",
        "GSC_REFRESH_TOKEN_007",
        "GSC_REFRESH_TOKEN_3x",
        "GSC_REFRESH_TOKEN_\uff19",  # a full-width 9: int() would take it, Postgres would not
        f"GSC_REFRESH_TOKEN_{2**63}",  # beyond bigint: no gsc_accounts.id can be it
        "gsc_refresh_token_3",
        "Gsc_Refresh_Token_3",
    ],
)
def test_a_refresh_token_variable_that_names_no_account_id_is_refused(name) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: "1//secret-rt-value"})
    message = str(caught.value)
    assert message.startswith(f"{name} does not name an account")
    assert "GSC_REFRESH_TOKEN_<ACCOUNT_ID>" in message
    assert "secret-rt-value" not in message and "\n" not in message


def test_a_misnamed_refresh_token_is_one_line_exit_2_in_a_real_process(tmp_path) -> None:
    (tmp_path / ".env").write_text("GSC_REFRESH_TOKEN_abc=1//secret-rt-value\n")
    line = one_line_error(run_cli(tmp_path, "check"))
    assert "GSC_REFRESH_TOKEN_abc does not name an account" in line
    assert "secret-rt-value" not in line


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("MATOMO_URL=https://m.example\nMATOMO_TOKEN abc-secret-token\n", 2),
        ("# comment\n\nexport A=1\nMATOMO_TOKEN='abc-secret-token\nB=2\n", 4),
        ('A=1\nB=2\nMATOMO_TOKEN="abc-secret-token" trailing\n', 3),
        ("=abc-secret-token\n", 1),
    ],
)
def test_an_env_file_line_that_is_not_a_setting_is_one_line_naming_it(tmp_path, text, line) -> None:
    (tmp_path / ".env").write_text(text)
    error = one_line_error(run_cli(tmp_path, "run"))
    assert f".env line {line} is not NAME=value" in error
    assert "abc-secret-token" not in error


def test_an_env_file_that_is_a_directory_is_one_line_naming_it(tmp_path) -> None:
    (tmp_path / ".env").mkdir()
    error = one_line_error(run_cli(tmp_path, "run"))
    assert ".env is not a file" in error


def test_an_env_file_with_comments_export_and_quotes_is_read(tmp_path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# the job's settings\n\nexport MATOMO_URL=https://m.example\n"
        "MATOMO_TOKEN='a b#c'  # inline comment\nGOOGLE_CLIENT_ID=\"id\"\nEMPTY=\n"
    )
    merged = read_environment(env_file)
    assert merged["MATOMO_URL"] == "https://m.example"
    assert merged["MATOMO_TOKEN"] == "a b#c"
    assert merged["GOOGLE_CLIENT_ID"] == "id"


def test_secrets_never_show_in_repr() -> None:
    settings = load_settings(
        {
            "MATOMO_URL": "https://matomo.example.com/",
            "MATOMO_TOKEN": "matomo-token-xyz",
            "GOOGLE_CLIENT_SECRET": "client-secret-xyz",
            "DATABASE_URL": "postgresql://u:db-password-xyz@h/db",
        }
    )
    shown = repr(settings) + str(settings.matomo_token)
    assert "xyz" not in shown
    assert settings.matomo_url == "https://matomo.example.com"
    assert settings.matomo_token.reveal() == "matomo-token-xyz"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"GSC_MAX_QPS_PER_ACCOUNT": "fast"}, "GSC_MAX_QPS_PER_ACCOUNT"),
        ({"GSC_MAX_QPS_PER_CLIENT": "0"}, "GSC_MAX_QPS_PER_CLIENT"),
        ({"MATOMO_BATCH_SIZE": "2.5"}, "MATOMO_BATCH_SIZE"),
        ({"AGGREGATOR_TIMEZONE": "Mars/Olympus"}, "AGGREGATOR_TIMEZONE"),
        ({"MATOMO_URL": "matomo.example.com"}, "MATOMO_URL"),
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL"),
    ],
)
def test_malformed_settings_name_the_variable(env: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names) as caught:
        load_settings(env)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("value", "zone"), [("utc", "UTC"), ("europe/berlin", "Europe/Berlin")])
def test_a_time_zone_in_the_wrong_case_is_named_in_the_right_one(value: str, zone: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"AGGREGATOR_TIMEZONE": value})
    assert str(caught.value) == (
        "AGGREGATOR_TIMEZONE must be an IANA time zone such as Europe/Berlin, "
        f"got {value!r} (names are case-sensitive: {zone})"
    )


def test_a_url_with_a_token_is_not_echoed_in_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GOOGLE_TOKEN_URL": "ftp://host/token?secret=abc123"})
    assert "abc123" not in str(caught.value)


def test_env_file_is_read_and_the_environment_wins(tmp_path, monkeypatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MATOMO_URL=https://from-file.example\nMATOMO_TOKEN='quoted token'\n")
    monkeypatch.setenv("MATOMO_URL", "https://from-env.example")
    merged = read_environment(env_file)
    assert merged["MATOMO_URL"] == "https://from-env.example"
    assert merged["MATOMO_TOKEN"] == "quoted token"


# --- Every setting is checked at start-up against its documented range ----------------------

ROOT = Path(__file__).resolve().parent.parent
NUMBER_GARBAGE = (
    *("", "  ", "fast", "nan", "NaN", "inf", "-inf", "-Infinity", "-1", "1e300"),
    *(
        "1_0",
        "\u0663",
        "\uff15",
        "0x10",
    ),  # Python's own spellings: 1_0, Arabic-Indic and fullwidth digits
)
BAD_URLS = (
    "matomo.example.com",
    "ftp://h.example/x",
    "http://",
    "http://[::1",
    "http://[zz",
    "http://[zz]/",
    "http://h.example:99999",
    "http://h.example:notaport",
    "http://h.example:0/",
    "http://user:pw@h.example/",
    "http://bad_host!/",
    "http://-h.example/",
    "http://h..example/",
    "http://h.example/index.php?module=API&token_auth=pw-xyz",
    "http://h.example/?",
    "http://h.example/#pw-xyz",
)
BAD_DSNS = (
    "mysql://x@y/z",
    "postgresql://u:pw-xyz@h:notaport/db",
    "postgresql://u:pw-xyz@h:99999/db",
    "postgresql://u:pw-xyz@h:0/db",
    "postgresql://u:pw-xyz@[::1/db",
    "postgresql://u:pw-xyz@[zz]/db",
    "postgresql://u:pw-xyz@bad host/db",
    "postgresql://u:pw-xyz@h1:5432,h2:70000/db",
)
BAD_ZONES = ("Mars/Olympus", "../../etc/passwd", "x" * 300)


def bad_values(setting: Setting) -> tuple[str, ...]:
    """Values outside what `setting` documents: garbage, non-finite, below and above its range."""
    if setting.kind in ("number", "count"):
        extra = [str(setting.low - 1), str(setting.high * 10 + 1), "9" * 400, "9" * 5000]
        if setting.low > 0:
            extra += ["0", "1e-320", str(setting.low / 2)]
        if setting.kind == "count":
            extra.append(f"{setting.low + 0.5}")
        return (*NUMBER_GARBAGE, *extra)
    return {"url": BAD_URLS, "dsn": BAD_DSNS, "zone": BAD_ZONES}.get(setting.kind, ())


BAD_SETTINGS = [
    pytest.param(setting, value, id=f"{setting.variable}={value[:24]!r}")
    for setting in SETTINGS
    for value in bad_values(setting)
]


def test_every_number_url_dsn_and_zone_setting_has_bad_values_to_try() -> None:
    checked = {param.values[0].variable for param in BAD_SETTINGS}
    open_text = {s.variable for s in SETTINGS if s.kind in ("secret", "text")}
    assert checked | open_text == {s.variable for s in SETTINGS}


@pytest.mark.parametrize(("setting", "value"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_exit_2_through_the_cli(
    setting: Setting, value: str, tmp_path, monkeypatch, capsys
) -> None:
    for name in [*os.environ]:
        if name.startswith(("MATOMO_", "GOOGLE_", "GSC_", "AGGREGATOR_", "HTTP_", "DATABASE_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(setting.variable, value)
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aggregator: error: "), err
    assert setting.variable in err and "Traceback" not in err
    assert "pw-xyz" not in err
    if setting.kind in ("number", "count"):
        assert setting.allowed in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "postgresql://postgres:pw-xyz@db.example:notaport/postgres"),
        ("DATABASE_URL", "postgresql://postgres:pw-xyz@db.example:123456/postgres"),
        ("DATABASE_URL", "postgresql://postgres:pw-xyz@[2001:db8::1/postgres"),
        ("MATOMO_URL", "http://[::1"),
        ("MATOMO_URL", "http://m.example:notaport"),
        ("GSC_API_URL", "http://[zz"),
        ("GSC_API_URL", "http://g.example:99999"),
        ("GSC_TIMEOUT_SECONDS", "1e300"),
        ("GSC_MAX_QPS_PER_ACCOUNT", "1e-320"),
    ],
)
def test_the_reported_bad_settings_exit_2_in_a_real_process(variable, value, tmp_path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MATOMO_", "GOOGLE_", "GSC_", "AGGREGATOR_", "HTTP_", "DATABASE_"))
    }
    env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/none"
    env[variable] = value
    result = subprocess.run(
        [sys.executable, "-m", "aggregator", "run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and variable in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "pw-xyz" not in result.stderr


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres:pw@db.abc.supabase.co:5432/postgres?sslmode=require",
        "postgres://postgres.abc:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
        "postgresql://postgres@[::1]:5432/test",
        "postgresql://postgres@h1.example:5432,h2.example:5433/test",
        "postgresql:///test?host=/var/run/postgresql",
    ],
)
def test_usable_dsns_are_accepted(dsn: str) -> None:
    assert load_settings({"DATABASE_URL": dsn}).require_database() == dsn


def test_in_range_values_are_read_with_their_type() -> None:
    settings = load_settings(
        {
            "GSC_TIMEOUT_SECONDS": " 0.5 ",
            "MATOMO_BATCH_SIZE": "1000",
            "AGGREGATOR_LOCK_WAIT_SECONDS": "0",
            "MATOMO_URL": "http://[::1]:8080/matomo/",
            "GSC_API_URL": "http://127.0.0.2:9",
        }
    )
    assert settings.gsc_timeout == 0.5 and settings.matomo_batch_size == 1000
    assert isinstance(settings.matomo_batch_size, int) and settings.lock_wait == 0
    assert settings.matomo_url == "http://[::1]:8080/matomo"


def test_settings_defaults_are_the_tables_and_inside_finite_ranges() -> None:
    defaults = Settings()
    for setting in SETTINGS:
        if setting.kind in ("number", "count", "url"):
            assert getattr(defaults, setting.field) == setting.default, setting.variable
        if setting.kind in ("number", "count"):
            assert math.isfinite(setting.low) and math.isfinite(setting.high), setting.variable
            if setting.default is not None:
                assert setting.low <= setting.default <= setting.high, setting.variable


def test_the_readme_shows_every_setting_with_its_range() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [line for line in configuration_table() if line not in readme]
    assert not missing, "README.md lacks (python -m aggregator.config prints them):\n" + "\n".join(
        missing
    )


def test_an_env_file_that_is_not_utf8_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / ".env").write_bytes(b"MATOMO_URL=http://x\xff\xfe\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".env" in err and "UTF-8" in err, err


def test_the_example_env_file_is_read_without_complaint() -> None:
    settings = load_settings(read_environment(ROOT / ".env.example"))
    assert settings.database_url is not None and settings.matomo_url == "https://matomo.example.com"


@pytest.mark.parametrize("name", ["matomo_token", "Database_Url", "aggregator_heal_days"])
def test_a_setting_in_the_wrong_case_is_refused_not_ignored(name) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: "secret-value-xyz"})
    assert str(caught.value) == (
        f"{name} is not read: variable names are case-sensitive, write {name.upper()}"
    )


def test_a_wrong_case_spelling_beside_the_right_one_is_ignored() -> None:
    settings = load_settings({"AGGREGATOR_HEAL_DAYS": "12", "aggregator_heal_days": "99"})
    assert settings.heal_days == 12
