"""Settings, read once from the environment at start-up (SPEC section 2); nothing reads os.environ later."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ledger.config import ConfigError as LedgerConfigError
from ledger.config import done_ttl_from
from ledger.money import parse_amount

__all__ = ["ConfigError", "Settings"]

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.toml")


class ConfigError(Exception):
    """A missing or malformed setting; start-up stops with this one line."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _database_url(raw: str | None) -> str | None:
    if not raw:
        return None
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ConfigError("DATABASE_URL must be a postgresql:// URL (unset: SQLite at DATABASE_PATH)")
    return raw


def _amount(env: Mapping[str, str], name: str, default: str) -> int:
    raw = env.get(name) or default
    if raw in ("0", "0.0", ""):
        return 0
    try:
        return parse_amount(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def _done_ttl(env: Mapping[str, str]) -> int:
    try:
        return done_ttl_from(env)
    except LedgerConfigError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None  # None: the embedded default (in-process Redis)
    database_path: Path = Path("var/gateway.sqlite3")
    # postgresql://...: the history lives in PostgreSQL (web processes on several hosts), not at
    # database_path. Not in repr: it may carry a password.
    database_url: str | None = field(default=None, repr=False)
    models_file: Path = DEFAULT_MODELS_FILE
    session_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    public_base_url: str = "http://127.0.0.1:8080"
    google_client_id: str | None = None
    google_client_secret: str | None = field(default=None, repr=False)
    oidc_issuer: str = "https://accounts.google.com"
    omise_public_key: str | None = None
    omise_secret_key: str | None = field(default=None, repr=False)
    omise_api_base: str = "https://api.omise.co"
    omise_webhook_secret: str | None = field(default=None, repr=False)
    omise_js_url: str | None = None  # default: Omise's CDN (or OMISE_API_BASE/omise.js for a fake)
    log_level: str = "INFO"
    key_concurrency_limit: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_connect_timeout_s: float = 10.0
    upstream_idle_timeout_s: float = 300.0
    ledger_prefix: str = "cp"
    ledger_shards: int = 16
    # Requests are refused (402) unless the balance covers the input and this much output.
    min_output_tokens: int = 256
    low_balance_default_micro: int = 0
    trial_credit_micro: int = 0
    trial_life_s: int = 30 * 24 * 3600
    topup_presets: tuple[int, ...] = (100, 300, 500, 1000)
    topup_min: int = 20
    topup_max: int = 100_000
    shutdown_grace_s: float = 30.0
    # How long Redis keeps each finished request's outcome (rd:*), for retried and replayed settlements.
    ledger_done_ttl_s: int = 7 * 24 * 3600
    # How often a live stream's progress (tokens so far) is noted on disk, for a process killed with -9.
    progress_every_s: float = 5.0
    # The worker: how often it runs reconcile, and the port of its /metrics (0: none).
    reconcile_every_s: float = 300.0
    worker_metrics_port: int = 0
    count_tokens_max_bytes: int = 4 * 1024 * 1024
    count_tokens_concurrency: int = 2
    auth_failure_limit: int = 20
    auth_failure_window_s: int = 60
    forwarded_hops: int = 0  # trusted proxies in front (X-Forwarded-For), for the 401 throttle
    metrics_token: str | None = field(default=None, repr=False)
    requested_host: str | None = None  # HOST as set, when the embedded default overrode it
    # The upstream environment (api keys named by the models file), captured once.
    provider_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def history_target(self) -> str:
        """What ledger.store.Store opens: the PostgreSQL URL when set, else the SQLite file."""
        return self.database_url or str(self.database_path)

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    @property
    def google_enabled(self) -> bool:
        return bool(self.google_client_id and self.google_client_secret)

    @property
    def omise_enabled(self) -> bool:
        return bool(self.omise_secret_key and self.omise_public_key)

    @property
    def cookie_secure(self) -> bool:
        return self.public_base_url.startswith("https://")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        host = env.get("HOST") or "127.0.0.1"
        port = _int(env, "PORT", 8080, minimum=0)
        redis_url = env.get("REDIS_URL") or None
        requested_host = None
        if redis_url is None and not _is_loopback(host):
            # SECURITY: the embedded default has a demo sign-in and play credit; it never listens
            # beyond this machine, whatever HOST says (the Procfile's web line sets 0.0.0.0).
            requested_host, host = host, "127.0.0.1"
        raw_secret = env.get("SESSION_SECRET")
        if raw_secret:
            session_secret = raw_secret.encode()
            if len(session_secret) < 32:
                raise ConfigError("SESSION_SECRET must be at least 32 characters")
        elif redis_url is None:
            session_secret = secrets.token_bytes(32)  # embedded: sessions end with the process
        else:
            raise ConfigError("SESSION_SECRET is required when REDIS_URL is set")
        presets_raw = env.get("TOPUP_PRESETS", "100,300,500,1000")
        try:
            presets = tuple(int(p) for p in presets_raw.split(",") if p.strip())
        except ValueError:
            raise ConfigError("TOPUP_PRESETS must be comma-separated whole amounts") from None
        level = (env.get("LOG_LEVEL") or "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}")
        return cls(
            host=host,
            port=port,
            redis_url=redis_url,
            database_path=Path(env.get("DATABASE_PATH") or "var/gateway.sqlite3"),
            database_url=_database_url(env.get("DATABASE_URL")),
            models_file=Path(env.get("MODELS_FILE") or DEFAULT_MODELS_FILE),
            session_secret=session_secret,
            public_base_url=(env.get("PUBLIC_BASE_URL") or f"http://{host}:{port}").rstrip("/"),
            google_client_id=env.get("GOOGLE_CLIENT_ID") or None,
            google_client_secret=env.get("GOOGLE_CLIENT_SECRET") or None,
            oidc_issuer=(env.get("OIDC_ISSUER") or "https://accounts.google.com").rstrip("/"),
            omise_public_key=env.get("OMISE_PUBLIC_KEY") or None,
            omise_secret_key=env.get("OMISE_SECRET_KEY") or None,
            omise_api_base=(env.get("OMISE_API_BASE") or "https://api.omise.co").rstrip("/"),
            omise_webhook_secret=env.get("OMISE_WEBHOOK_SECRET") or None,
            omise_js_url=env.get("OMISE_JS_URL") or None,
            log_level=level,
            key_concurrency_limit=_int(env, "KEY_CONCURRENCY_LIMIT", 16, minimum=1),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 32 * 1024 * 1024, minimum=1024),
            upstream_connect_timeout_s=_float(env, "UPSTREAM_CONNECT_TIMEOUT_S", 10.0),
            upstream_idle_timeout_s=_float(env, "UPSTREAM_IDLE_TIMEOUT_S", 300.0),
            ledger_prefix=env.get("LEDGER_PREFIX") or "cp",
            ledger_shards=_int(env, "LEDGER_SHARDS", 16, minimum=1),
            min_output_tokens=_int(env, "MIN_OUTPUT_TOKENS", 256, minimum=1),
            low_balance_default_micro=_amount(env, "LOW_BALANCE_DEFAULT", "0"),
            trial_credit_micro=_amount(env, "TRIAL_CREDIT", "0"),
            trial_life_s=_int(env, "TRIAL_LIFE_S", 30 * 24 * 3600, minimum=60),
            topup_presets=presets,
            topup_min=_int(env, "TOPUP_MIN", 20, minimum=1),
            topup_max=_int(env, "TOPUP_MAX", 100_000, minimum=1),
            shutdown_grace_s=_float(env, "SHUTDOWN_GRACE_S", 30.0),
            ledger_done_ttl_s=_done_ttl(env),
            progress_every_s=_float(env, "PROGRESS_EVERY_S", 5.0),
            reconcile_every_s=_float(env, "RECONCILE_EVERY_S", 300.0),
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", 0),
            count_tokens_max_bytes=_int(env, "COUNT_TOKENS_MAX_BYTES", 4 * 1024 * 1024, minimum=1024),
            count_tokens_concurrency=_int(env, "COUNT_TOKENS_CONCURRENCY", 2, minimum=1),
            auth_failure_limit=_int(env, "AUTH_FAILURE_LIMIT", 20, minimum=1),
            auth_failure_window_s=_int(env, "AUTH_FAILURE_WINDOW_S", 60, minimum=1),
            forwarded_hops=_int(env, "FORWARDED_HOPS", 0),
            metrics_token=env.get("METRICS_TOKEN") or None,
            requested_host=requested_host,
            provider_env=dict(env),
        )
