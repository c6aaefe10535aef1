"""Configuration: defaults, then the instance file, then ``CLEANMAIL_*`` variables.

Nothing is read at import time; ``load()`` builds a frozen ``Config`` and raises
``ConfigError`` with one line that names the setting when a value is wrong.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "CLEANMAIL_"
INSTANCE_FILE = "cleanmail.toml"
MAX_MESSAGE_SIZE = 18 * 1024 * 1024


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line for the operator."""


@dataclass(frozen=True)
class Endpoint:
    """A host and TCP port, as in ``127.0.0.1:10024``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Config:
    """Every setting of one Cleanmail installation."""

    data_dir: Path
    database_url: str
    secret_keys: tuple[str, ...]
    base_url: str
    filter_listen: Endpoint
    relay: Endpoint
    web_listen: Endpoint
    hostname: str
    max_message_size: int = MAX_MESSAGE_SIZE
    max_recipients: int = 1000
    quarantine_threshold: float = 5.0
    retention_days: int = 30
    verdict_timeout: float = 30.0
    relay_timeout: float = 60.0
    trusted_authserv_id: str | None = None
    dns_timeout: float = 2.0
    dns_servers: tuple[str, ...] = ()
    filter_workers: int = 0  # 0: one per CPU core
    web_workers: int = 2
    trusted_proxies: int = 0
    mail_from: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    # The learning classifier (issue 6): on by default; it scores nothing until trained.
    classifier: bool = True
    classifier_reload: float = 5.0  # seconds between a filter's checks for a new model
    # Verdict engines (README "Verdict engines"): embedded ones first, external ones
    # chained after them for undecided mail.
    engines: tuple[str, ...] = ("rules",)
    engine_timeout: float = 10.0
    engine_fail_open: bool = False
    engine_max_size: int = 1024 * 1024  # larger mail is left to the embedded engines
    rspamd_url: str = "http://127.0.0.1:11333"
    rspamd_controller_url: str = "http://127.0.0.1:11334"
    rspamd_password: str = ""
    spamd_host: str = "127.0.0.1"
    spamd_port: int = 783
    spamd_reject_score: float = 15.0

    @property
    def external_engines(self) -> tuple[str, ...]:
        """The configured engines that run outside Cleanmail."""
        return tuple(name for name in self.engines if name in EXTERNAL_ENGINES)

    # Quarantine reports: relay connections sending at once (per process), and the
    # processes that send a large run.
    report_senders: int = 4
    report_processes: int = 2

    @property
    def store_dir(self) -> Path:
        """Where raw messages live."""
        return self.data_dir / "store"

    @property
    def is_embedded_database(self) -> bool:
        """True when the database is the default SQLite file in the data dir."""
        return self.database_url == default_database_url(self.data_dir)


def default_database_url(data_dir: Path) -> str:
    """The embedded SQLite database inside the data dir."""
    return f"sqlite:///{data_dir / 'cleanmail.db'}"


def parse_endpoint(value: str) -> Endpoint:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return Endpoint(host, int(port))


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a positive whole number, got {value!r}")
    return number


def _whole_number(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"expected a whole number, 0 or more, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def _word_list(value: str) -> tuple[str, ...]:
    return tuple(item for item in value.replace(",", " ").split() if item)


def _database_url(value: str) -> str:
    if not value.startswith(("sqlite:///", "postgresql+psycopg://", "postgresql://")):
        raise ValueError("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
    if value.startswith("postgresql://"):
        value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
    return value


def _base_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// address, got {value!r}")
    return value.rstrip("/")


EMBEDDED_ENGINES = ("rules",)
EXTERNAL_ENGINES = ("rspamd", "spamassassin")


def _engine_list(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.lower() for name in _word_list(value)))
    known = EMBEDDED_ENGINES + EXTERNAL_ENGINES
    for name in names:
        if name not in known:
            raise ValueError(f"unknown engine {name!r}: expected some of {', '.join(known)}")
    if not names:
        raise ValueError("expected at least one engine, e.g. rules,rspamd")
    return names


def _port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError(f"expected a port number from 1 to 65535, got {value!r}")
    return number


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
    return level


def _log_format(value: str) -> str:
    if value.lower() not in ("text", "keyvalue", "json"):
        raise ValueError(f"expected text, keyvalue or json, got {value!r}")
    return value.lower()


def _switch(value: str) -> bool:
    word = value.strip().lower()
    if word not in {"on", "off", "true", "false", "yes", "no", "1", "0"}:
        raise ValueError(f"expected on or off, got {value!r}")
    return word in {"on", "true", "yes", "1"}


# name -> parser of the text form; the instance file may also give native TOML values.
PARSERS: dict[str, Callable[[str], Any]] = {
    "database_url": _database_url,
    "secret_key": _word_list,
    "base_url": _base_url,
    "filter_listen": parse_endpoint,
    "relay": parse_endpoint,
    "web_listen": parse_endpoint,
    "hostname": str,
    "max_message_size": _positive_int,
    "max_recipients": _positive_int,
    "quarantine_threshold": float,
    "retention_days": _positive_int,
    "verdict_timeout": _positive_float,
    "relay_timeout": _positive_float,
    "trusted_authserv_id": str,
    "dns_timeout": _positive_float,
    "dns_servers": _word_list,
    "filter_workers": _whole_number,
    "web_workers": _positive_int,
    "trusted_proxies": int,
    "mail_from": str,
    "log_level": _log_level,
    "log_format": _log_format,
    "classifier": _switch,
    "classifier_reload": _positive_float,
    "engines": _engine_list,
    "engine_timeout": _positive_float,
    "engine_fail_open": _switch,
    "engine_max_size": _positive_int,
    "rspamd_url": _base_url,
    "rspamd_controller_url": _base_url,
    "rspamd_password": str,
    "spamd_host": str,
    "spamd_port": _port,
    "spamd_reject_score": float,
    "report_senders": _positive_int,
    "report_processes": _positive_int,
}

DEFAULTS: dict[str, str] = {
    "filter_listen": "127.0.0.1:10024",
    "relay": "127.0.0.1:10025",
    "web_listen": "127.0.0.1:8080",
}


def load(environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the instance file and the environment."""
    environ = os.environ if environ is None else environ
    data_dir = Path(environ.get(PREFIX + "DATA_DIR", "instance")).absolute()
    raw: dict[str, Any] = dict(DEFAULTS)
    raw.update(_read_instance_file(environ, data_dir))
    for name in PARSERS:
        if PREFIX + name.upper() in environ:
            raw[name] = environ[PREFIX + name.upper()]
    unknown = sorted(set(raw) - set(PARSERS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in {data_dir / INSTANCE_FILE}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None or value == "":
            continue
        try:
            values[name] = PARSERS[name](value) if isinstance(value, str) else _native(name, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{PREFIX}{name.upper()}: {exc}") from None
    values.setdefault("database_url", default_database_url(data_dir))
    web = values["web_listen"]
    values.setdefault("base_url", f"http://{web}")
    values.setdefault("hostname", "cleanmail.localdomain")
    values.setdefault("mail_from", f"Cleanmail <postmaster@{values['hostname']}>")
    keys = values.pop("secret_key", ())
    if not keys:
        keys = _embedded_secret_key(data_dir, values["database_url"])
    if not values.get("filter_workers"):
        values["filter_workers"] = min(os.cpu_count() or 1, 8)
    config = Config(data_dir=data_dir, secret_keys=tuple(keys), **values)
    if config.external_engines and config.engine_timeout >= config.verdict_timeout:
        # Otherwise the filter would give up on the message before the engine's own error.
        raise ConfigError(
            f"{PREFIX}ENGINE_TIMEOUT ({config.engine_timeout:g} s) must be shorter than "
            f"{PREFIX}VERDICT_TIMEOUT ({config.verdict_timeout:g} s)"
        )
    return config


def _native(name: str, value: Any) -> Any:
    """Accept TOML numbers and lists as they are, checked through the text parser."""
    if isinstance(value, list):
        return PARSERS[name](" ".join(str(item) for item in value))
    return PARSERS[name](str(value))


def _read_instance_file(environ: Mapping[str, str], data_dir: Path) -> dict[str, Any]:
    path = Path(environ.get(PREFIX + "CONFIG", data_dir / INSTANCE_FILE))
    if not path.exists():
        if PREFIX + "CONFIG" in environ:
            raise ConfigError(f"{PREFIX}CONFIG: no such file {path}")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _embedded_secret_key(data_dir: Path, database_url: str) -> tuple[str, ...]:
    """Keep a generated key beside the embedded database; demand one for shared databases."""
    if database_url != default_database_url(data_dir):
        raise ConfigError(
            f"{PREFIX}SECRET_KEY is not set: every node of a shared installation needs the same key"
        )
    path = data_dir / "secret_key"
    try:
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
        return (path.read_text().strip(),)
    except FileExistsError:
        return (path.read_text().strip(),)
    except OSError as exc:
        raise ConfigError(f"{PREFIX}DATA_DIR: cannot use {data_dir}: {exc.strerror}") from None
