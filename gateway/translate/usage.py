"""Token usage reshaped between formats (api-formats 4.3); the gateway bills from its own parser."""

from __future__ import annotations

from typing import Any

__all__ = ["anthropic_usage_to_openai", "count", "openai_usage_to_anthropic"]


def count(value: Any) -> int:
    # Upstreams send null, missing or (rarely) float counts; a count is never negative.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(int(value), 0)


def openai_usage_to_anthropic(usage: dict[str, Any] | None) -> dict[str, int]:
    """OpenAI/DeepSeek usage -> Anthropic usage, where input_tokens excludes the cached parts."""
    usage = usage or {}
    prompt = count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details") or {}
    if "prompt_cache_hit_tokens" in usage:  # DeepSeek's own field is authoritative when present
        hit = count(usage.get("prompt_cache_hit_tokens"))
    else:
        hit = count(details.get("cached_tokens"))
    creation = count(details.get("cache_write_tokens") or details.get("cache_creation_tokens"))
    return {
        "input_tokens": max(prompt - hit - creation, 0),
        "output_tokens": count(usage.get("completion_tokens")),
        "cache_read_input_tokens": hit,
        "cache_creation_input_tokens": creation,
    }


def anthropic_usage_to_openai(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage, where prompt_tokens includes cache reads and writes."""
    usage = usage or {}
    read = count(usage.get("cache_read_input_tokens"))
    creation = count(usage.get("cache_creation_input_tokens"))
    prompt = count(usage.get("input_tokens")) + read + creation
    completion = count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
    }
