"""The model and provider registry (SPEC section 3), loaded once from ``MODELS_FILE``.

Prices become integer micro-units per 1M tokens at load time; nothing on the request path touches a
decimal string or a float.
"""

from __future__ import annotations

import fnmatch
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ledger.money import price_per_million_micro

from .settings import ConfigError

__all__ = [
    "DEMO_BASE_URL",
    "Capabilities",
    "Model",
    "PriceWindow",
    "Prices",
    "Provider",
    "Registry",
    "load_registry",
]

DEMO_BASE_URL = "internal:demo"
Format = Literal["openai", "anthropic"]
# How an OpenAI-format upstream takes a request for reasoning: DeepSeek's `thinking` switch, OpenAI's
# `reasoning_effort`, or not at all (the client's thinking settings are then dropped).
Reasoning = Literal["none", "deepseek", "openai"]
# What an OpenAI-format upstream accepts as `response_format` for structured output.
StructuredOutput = Literal["json_schema", "json_object", "none"]


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    format: Format
    api_key: str | None
    api_key_env: str | None

    @property
    def endpoint(self) -> str:
        # openai: base ends in /v1; anthropic: the API root.
        if self.format == "openai":
            return self.base_url.rstrip("/") + "/chat/completions"
        return self.base_url.rstrip("/") + "/v1/messages"

    @property
    def internal(self) -> bool:
        return self.base_url == DEMO_BASE_URL


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a model's upstream can carry of a translated request (the rest is mapped or dropped)."""

    reasoning: Reasoning = "none"
    structured_output: StructuredOutput = "json_schema"


@dataclass(frozen=True, slots=True)
class Prices:
    """Micro-units per 1M tokens."""

    hit: int
    miss: int
    write: int
    out: int


@dataclass(frozen=True, slots=True)
class PriceWindow:
    """Other prices for requests that start inside a daily UTC window (e.g. a provider's off-peak
    discount). ``start_min``/``end_min`` are minutes after midnight UTC; the window may wrap midnight."""

    start_min: int
    end_min: int
    prices: Prices

    def contains(self, minute_of_day: int) -> bool:
        if self.start_min <= self.end_min:
            return self.start_min <= minute_of_day < self.end_min
        return minute_of_day >= self.start_min or minute_of_day < self.end_min


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    provider: Provider
    upstream_model: str
    display_name: str
    price_hit: int  # micro-units per 1M tokens
    price_miss: int
    price_write: int
    price_out: int
    max_output_tokens: int
    created: int
    windows: tuple[PriceWindow, ...] = ()
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)

    def prices_at(self, ms: int) -> Prices:
        """The prices for a request that started at ``ms`` (epoch milliseconds)."""
        if self.windows:
            minute = (ms // 60_000) % 1440
            for w in self.windows:
                if w.contains(minute):
                    return w.prices
        return Prices(self.price_hit, self.price_miss, self.price_write, self.price_out)


@dataclass(frozen=True, slots=True)
class Registry:
    currency: str
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    # Exact aliases, and `*` patterns most specific first (more literal characters, then file order).
    exact_aliases: Mapping[str, Model] = field(default_factory=dict)
    patterns: tuple[tuple[str, Model], ...] = ()

    def get(self, name: str) -> Model | None:
        """The model serving ``name``: a model's own name, else an exact alias, else a pattern."""
        model = self.models.get(name) or self.exact_aliases.get(name)
        if model is not None:
            return model
        for pattern, target in self.patterns:
            if fnmatch.fnmatchcase(name, pattern):
                return target
        return None

    def listed_names(self) -> list[tuple[str, Model]]:
        """Every name a client may pick: the models and their plain (non-wildcard) aliases."""
        names = [(m.name, m) for m in self.models.values()]
        names += [(a, m) for a, m in self.exact_aliases.items()]
        return sorted(names, key=lambda pair: pair[0])

    def suggested_model(self) -> str:
        """The model to name in setup snippets: the one answering Claude Code's names, else the first."""
        if self.patterns:
            return self.patterns[-1][1].name
        return next(iter(self.models))

    def with_aliases_to(self, target: str) -> Registry:
        """The same registry with every alias answered by ``target`` (the embedded default points
        Claude Code's model names at the local demo model, since no provider key is set there)."""
        model = self.models[target]
        return Registry(
            self.currency,
            self.providers,
            self.models,
            {a: model for a in self.exact_aliases},
            tuple((p, model) for p, _ in self.patterns),
        )


def load_registry(path: Path, env: Mapping[str, str]) -> Registry:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"MODELS_FILE not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"MODELS_FILE {path} is not valid TOML: {e}") from None
    currency = str(data.get("currency", "THB"))
    providers: dict[str, Provider] = {}
    for name, p in (data.get("providers") or {}).items():
        fmt = p.get("format", "openai")
        if fmt not in ("openai", "anthropic"):
            raise ConfigError(f"provider {name}: format must be 'openai' or 'anthropic'")
        base_url = p.get("base_url")
        if not base_url:
            raise ConfigError(f"provider {name}: base_url is required")
        key_env = p.get("api_key_env")
        providers[name] = Provider(name, str(base_url), fmt, env.get(key_env) if key_env else None, key_env)
    models: dict[str, Model] = {}
    created = int(path.stat().st_mtime) if path.exists() else int(time.time())
    for name, m in (data.get("models") or {}).items():
        prov = providers.get(m.get("provider", ""))
        if prov is None:
            raise ConfigError(f"model {name}: unknown provider {m.get('provider')!r}")
        try:
            miss = price_per_million_micro(m["price_input_cache_miss"])
            windows = tuple(_window(w, _prices(w)) for w in m.get("price_windows", ()))
            models[name] = Model(
                name=name,
                provider=prov,
                upstream_model=str(m.get("upstream_model", name)),
                display_name=str(m.get("display_name", name)),
                price_hit=price_per_million_micro(m.get("price_input_cache_hit", m["price_input_cache_miss"])),
                price_miss=miss,
                price_write=price_per_million_micro(m["price_input_cache_write"])
                if "price_input_cache_write" in m
                else miss,
                price_out=price_per_million_micro(m["price_output"]),
                max_output_tokens=int(m.get("max_output_tokens", 4096)),
                created=created,
                windows=windows,
                aliases=_aliases(name, m.get("aliases", [])),
                capabilities=Capabilities(
                    reasoning=_choice(name, m, "reasoning", ("none", "deepseek", "openai"), "none"),
                    structured_output=_choice(
                        name, m, "structured_output", ("json_schema", "json_object", "none"), "json_schema"
                    ),
                ),
            )
        except KeyError as e:
            raise ConfigError(f"model {name}: {e.args[0]} is required") from None
        except ValueError as e:
            raise ConfigError(f"model {name}: {e}") from None
    if not models:
        raise ConfigError(f"MODELS_FILE {path} defines no models")
    exact: dict[str, Model] = {}
    patterns: list[tuple[str, Model]] = []
    for model in models.values():
        for alias in model.aliases:
            if alias in models:
                raise ConfigError(f"model {model.name}: alias {alias!r} is already a model's name")
            if "*" in alias:
                patterns.append((alias, model))
            elif alias in exact:
                raise ConfigError(f"model {model.name}: alias {alias!r} is taken by {exact[alias].name}")
            else:
                exact[alias] = model
    # Stable sort: among patterns equally specific, the file's order decides.
    patterns.sort(key=lambda pair: -len(pair[0].replace("*", "")))
    return Registry(currency, providers, models, exact, tuple(patterns))


def _aliases(model: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
        raise ValueError("aliases must be a list of non-empty strings")
    for a in value:
        if any(c in a for c in "?[]"):
            raise ValueError(f"alias {a!r}: only `*` is a wildcard")
    return tuple(value)


def _choice(model: str, m: Mapping[str, object], key: str, allowed: tuple[str, ...], default: str) -> Any:
    value = m.get(key, default)
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}")
    return value


def _prices(m: Mapping[str, object]) -> Prices:
    miss = price_per_million_micro(str(m["price_input_cache_miss"]))
    return Prices(
        hit=price_per_million_micro(str(m.get("price_input_cache_hit", m["price_input_cache_miss"]))),
        miss=miss,
        write=price_per_million_micro(str(m["price_input_cache_write"])) if "price_input_cache_write" in m else miss,
        out=price_per_million_micro(str(m["price_output"])),
    )


def _minute(text: str) -> int:
    hh, _, mm = text.strip().partition(":")
    h, mi = int(hh), int(mm or 0)
    if not (0 <= h <= 24 and 0 <= mi < 60) or h * 60 + mi > 1440:
        raise ValueError(f"bad time of day {text!r}")
    return (h * 60 + mi) % 1440


def _window(w: Mapping[str, object], prices: Prices) -> PriceWindow:
    start, sep, end = str(w.get("utc", "")).partition("-")
    if not sep:
        raise ValueError("price_windows need utc = 'HH:MM-HH:MM'")
    return PriceWindow(_minute(start), _minute(end), prices)
