import pytest

from aggregator.config import ConfigError, Secret, load_settings, read_environment


def test_defaults_survive_a_new_cloud_projects_quota() -> None:
    settings = load_settings({})
    assert settings.gsc_max_qps_per_client * 60 <= 60
    assert settings.google_token_url == "https://oauth2.googleapis.com/token"
    assert settings.gsc_api_url == "https://searchconsole.googleapis.com"
    assert str(settings.timezone) == "UTC"
    assert not settings.matomo_configured and not settings.gsc_configured


def test_refresh_token_overrides_are_read_per_account() -> None:
    settings = load_settings({"GSC_REFRESH_TOKEN_7": "1//rt-seven", "GSC_REFRESH_TOKEN_X": "no"})
    assert settings.gsc_refresh_tokens == {7: Secret("1//rt-seven")}


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
