"""Settings are read once and fail at boot naming the setting; the shipped model registry is priced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.models import load_registry
from gateway.settings import DEFAULT_MODELS_FILE, ConfigError, Settings


def test_defaults_are_the_embedded_mode() -> None:
    s = Settings.from_env({})
    assert s.embedded and s.port == 8080 and s.host == "127.0.0.1"
    assert s.public_base_url == "http://127.0.0.1:8080"
    assert s.key_concurrency_limit == 16 and s.max_body_bytes == 32 * 1024 * 1024
    assert (s.upstream_connect_timeout_s, s.upstream_idle_timeout_s) == (10.0, 300.0)
    assert len(s.session_secret) == 32  # generated per run
    assert not s.google_enabled and not s.omise_enabled


def test_session_secret_is_required_outside_embedded_mode() -> None:
    with pytest.raises(ConfigError, match="SESSION_SECRET"):
        Settings.from_env({"REDIS_URL": "redis://x"})
    with pytest.raises(ConfigError, match="SESSION_SECRET must be at least 32"):
        Settings.from_env({"REDIS_URL": "redis://x", "SESSION_SECRET": "short"})
    s = Settings.from_env({"REDIS_URL": "redis://x", "SESSION_SECRET": "s" * 40, "PUBLIC_BASE_URL": "https://cp.example/"})
    assert s.cookie_secure and s.public_base_url == "https://cp.example"


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "eighty"), ("KEY_CONCURRENCY_LIMIT", "0"), ("UPSTREAM_IDLE_TIMEOUT_S", "-1"), ("LOG_LEVEL", "LOUD"),
     ("TRIAL_CREDIT", "1.0000001")],
)
def test_a_malformed_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_serve_stops_with_one_line_naming_the_missing_setting(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"REDIS_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SESSION_SECRET" in lines[0]


def test_shipped_registry_has_real_providers_with_cache_prices() -> None:
    reg = load_registry(DEFAULT_MODELS_FILE, {"DEEPSEEK_API_KEY": "k"})
    ds = reg.models["deepseek-chat"]
    assert ds.provider.format == "openai" and ds.provider.api_key == "k"
    assert ds.provider.endpoint == "https://api.deepseek.com/v1/chat/completions"
    assert 0 < ds.price_hit < ds.price_miss < ds.price_out  # micro-units per 1M tokens, integers
    claude = next(m for m in reg.models.values() if m.provider.format == "anthropic")
    assert claude.provider.endpoint == "https://api.anthropic.com/v1/messages"
    assert claude.price_write > claude.price_miss > claude.price_hit
    assert any(m.provider.name == "openai" for m in reg.models.values())
    assert reg.models["demo"].provider.internal


def test_a_bad_models_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "m.toml"
    bad.write_text('[models.x]\nprovider = "nope"\n')
    with pytest.raises(ConfigError, match="unknown provider"):
        load_registry(bad, {})
    with pytest.raises(ConfigError, match="not found"):
        load_registry(tmp_path / "missing.toml", {})


def test_price_windows_wrap_midnight_and_pick_by_start_time(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text(
        '[providers.p]\nbase_url = "http://x/v1"\n'
        '[models.m]\nprovider = "p"\nprice_input_cache_miss = "2"\nprice_output = "8"\n'
        '[[models.m.price_windows]]\nutc = "16:30-00:30"\nprice_input_cache_miss = "1"\nprice_output = "4"\n'
    )
    m = load_registry(f, {}).models["m"]
    day = 1_790_000_000_000 - 1_790_000_000_000 % 86_400_000  # a UTC midnight

    def at(h: int, mi: int) -> int:
        return m.prices_at(day + (h * 60 + mi) * 60_000).out

    assert (at(16, 29), at(16, 30), at(23, 59), at(0, 0), at(0, 29), at(0, 30), at(12, 0)) == (
        8_000_000, 4_000_000, 4_000_000, 4_000_000, 4_000_000, 8_000_000, 8_000_000,
    )
    f.write_text(f.read_text().replace("16:30-00:30", "25:00-01:00"))
    with pytest.raises(ConfigError, match="bad time of day"):
        load_registry(f, {})
