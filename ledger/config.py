"""The ledger's settings for the ops CLI and the worker, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .keys import Keyspace

__all__ = ["EMBEDDED_URL_FILE", "ConfigError", "LedgerConfig", "done_ttl_from", "embedded_url_path"]

# `python -m gateway serve` without REDIS_URL writes the loopback URL of its in-process Redis here,
# next to the database, so that the ops CLI run beside it reaches the same ledger.
EMBEDDED_URL_FILE = "embedded-redis.url"


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def embedded_url_path(database_path: str) -> Path:
    return Path(database_path).resolve().parent / EMBEDDED_URL_FILE


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    redis_url: str | None  # None: the embedded gateway's in-process Redis
    database_path: str
    database_url: str | None  # postgresql://...: the history in PostgreSQL instead of database_path
    prefix: str
    shards: int
    actor: str
    currency: str
    done_ttl_s: int = 7 * 24 * 3600

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LedgerConfig:
        env = os.environ if environ is None else environ
        shards_text = env.get("LEDGER_SHARDS", "16")
        try:
            shards = int(shards_text)
        except ValueError:
            raise ConfigError("LEDGER_SHARDS must be an integer") from None
        if not 1 <= shards <= 256:
            raise ConfigError("LEDGER_SHARDS must be between 1 and 256")
        prefix = env.get("LEDGER_PREFIX", "cp") or "cp"
        done_ttl_s = done_ttl_from(env)
        database_url = env.get("DATABASE_URL") or None
        if database_url and not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL must be a postgresql:// URL (unset: SQLite at DATABASE_PATH)")
        actor = env.get("LEDGER_ACTOR") or env.get("USER") or env.get("LOGNAME") or _os_user()
        return cls(
            redis_url=env.get("REDIS_URL") or None,
            database_path=env.get("DATABASE_PATH") or "./var/gateway.sqlite3",
            database_url=database_url,
            prefix=prefix,
            shards=shards,
            actor=actor,
            currency=env.get("CURRENCY") or "THB",
            done_ttl_s=done_ttl_s,
        )

    @property
    def history_target(self) -> str:
        """What ledger.store.Store opens: the PostgreSQL URL when set, else the SQLite file."""
        return self.database_url or self.database_path

    @property
    def keyspace(self) -> Keyspace:
        return Keyspace(prefix=self.prefix, shards=self.shards)

    def resolve_redis_url(self) -> str:
        """REDIS_URL, else the URL the running embedded gateway published; ConfigError when neither."""
        if self.redis_url:
            return self.redis_url
        path = embedded_url_path(self.database_path)
        try:
            url = path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"REDIS_URL is not set and no embedded gateway is running ({path} not found); "
                "start `python -m gateway serve` or set REDIS_URL"
            ) from None
        if not url:
            raise ConfigError(f"{path} is empty; restart `python -m gateway serve` or set REDIS_URL")
        return url


MIN_DONE_TTL_S = 3600


def done_ttl_from(env: Mapping[str, str]) -> int:
    """LEDGER_DONE_TTL_S: how long Redis keeps a finished request's outcome (one small `rd:*` key per
    request), so a retried or replayed settlement answers "done" instead of charging again."""
    raw = env.get("LEDGER_DONE_TTL_S") or str(7 * 24 * 3600)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError("LEDGER_DONE_TTL_S must be an integer number of seconds") from None
    if value < MIN_DONE_TTL_S:
        raise ConfigError(f"LEDGER_DONE_TTL_S must be at least {MIN_DONE_TTL_S} (an hour)")
    return value


def _os_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "unknown"
