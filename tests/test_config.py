"""Configuration: defaults, instance file, environment, and one clear line when wrong."""

from pathlib import Path

import pytest

from cleanmail import config


def test_defaults_use_the_embedded_database(tmp_path: Path) -> None:
    cfg = config.load({"CLEANMAIL_DATA_DIR": str(tmp_path)})
    assert cfg.database_url == f"sqlite:///{tmp_path / 'cleanmail.db'}"
    assert str(cfg.filter_listen) == "127.0.0.1:10024"
    assert str(cfg.relay) == "127.0.0.1:10025"
    assert str(cfg.web_listen) == "127.0.0.1:8080"
    assert cfg.max_message_size == 18 * 1024 * 1024
    assert cfg.is_embedded_database


def test_embedded_secret_key_is_generated_once_and_private(tmp_path: Path) -> None:
    first = config.load({"CLEANMAIL_DATA_DIR": str(tmp_path)})
    second = config.load({"CLEANMAIL_DATA_DIR": str(tmp_path)})
    assert first.secret_keys == second.secret_keys
    assert len(first.secret_keys[0]) >= 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_instance_file_then_environment(tmp_path: Path) -> None:
    (tmp_path / "cleanmail.toml").write_text(
        'relay = "10.0.0.5:25"\nquarantine_threshold = 7\nsecret_key = ["old", "new"]\n'
    )
    cfg = config.load(
        {"CLEANMAIL_DATA_DIR": str(tmp_path), "CLEANMAIL_QUARANTINE_THRESHOLD": "6.5"}
    )
    assert str(cfg.relay) == "10.0.0.5:25"
    assert cfg.quarantine_threshold == 6.5
    assert cfg.secret_keys == ("old", "new")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CLEANMAIL_RELAY", "nohost", "CLEANMAIL_RELAY: expected HOST:PORT"),
        ("CLEANMAIL_FILTER_LISTEN", "127.0.0.1:99999", "CLEANMAIL_FILTER_LISTEN"),
        ("CLEANMAIL_DATABASE_URL", "mysql://x", "CLEANMAIL_DATABASE_URL"),
        ("CLEANMAIL_BASE_URL", "ftp://x", "CLEANMAIL_BASE_URL"),
        ("CLEANMAIL_RETENTION_DAYS", "-1", "CLEANMAIL_RETENTION_DAYS"),
    ],
)
def test_wrong_values_fail_with_one_line_naming_the_setting(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(config.ConfigError) as error:
        config.load({"CLEANMAIL_DATA_DIR": str(tmp_path), name: value})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_shared_database_needs_a_secret_key(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="CLEANMAIL_SECRET_KEY is not set"):
        config.load(
            {
                "CLEANMAIL_DATA_DIR": str(tmp_path),
                "CLEANMAIL_DATABASE_URL": "postgresql+psycopg://cm@db/cleanmail",
            }
        )


def test_unknown_instance_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / "cleanmail.toml").write_text('relya = "x:1"\n')
    with pytest.raises(config.ConfigError, match="relya"):
        config.load({"CLEANMAIL_DATA_DIR": str(tmp_path)})


def test_engines_are_chosen_by_configuration(tmp_path: Path) -> None:
    cfg = config.load({"CLEANMAIL_DATA_DIR": str(tmp_path)})
    assert cfg.engines == ("rules",) and cfg.external_engines == ()
    assert not cfg.engine_fail_open
    (tmp_path / "cleanmail.toml").write_text(
        'engines = ["rules", "spamassassin"]\nengine_fail_open = true\nspamd_port = 7830\n'
    )
    cfg = config.load(
        {
            "CLEANMAIL_DATA_DIR": str(tmp_path),
            "CLEANMAIL_ENGINES": "Rules, rspamd",
            "CLEANMAIL_RSPAMD_URL": "http://rspamd.internal:11333/",
            "CLEANMAIL_ENGINE_TIMEOUT": "3",
        }
    )
    assert cfg.engines == ("rules", "rspamd") and cfg.external_engines == ("rspamd",)
    assert cfg.rspamd_url == "http://rspamd.internal:11333"
    assert (cfg.engine_fail_open, cfg.spamd_port, cfg.engine_timeout) == (True, 7830, 3.0)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("ENGINES", "rules,bogofilter", "unknown engine 'bogofilter'"),
        ("ENGINES", ",", "at least one engine"),
        ("ENGINE_FAIL_OPEN", "maybe", "expected on or off"),
        ("SPAMD_PORT", "70000", "port number"),
        ("RSPAMD_URL", "127.0.0.1:11333", "http://"),
    ],
)
def test_wrong_engine_settings_fail_with_one_line(
    tmp_path: Path, name: str, value: str, words: str
) -> None:
    with pytest.raises(config.ConfigError) as error:
        config.load({"CLEANMAIL_DATA_DIR": str(tmp_path), f"CLEANMAIL_{name}": value})
    message = str(error.value)
    assert message.startswith(f"CLEANMAIL_{name}: ") and words in message
    assert "\n" not in message


def test_an_engine_timeout_must_leave_room_within_the_verdict_timeout(tmp_path: Path) -> None:
    environ = {
        "CLEANMAIL_DATA_DIR": str(tmp_path),
        "CLEANMAIL_ENGINES": "rules,rspamd",
        "CLEANMAIL_VERDICT_TIMEOUT": "10",
        "CLEANMAIL_ENGINE_TIMEOUT": "10",
    }
    with pytest.raises(config.ConfigError, match=r"ENGINE_TIMEOUT .* shorter than .*VERDICT"):
        config.load(environ)
    assert config.load({**environ, "CLEANMAIL_ENGINES": "rules"}).engine_timeout == 10
