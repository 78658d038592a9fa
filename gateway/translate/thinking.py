"""Anthropic extended-thinking settings kept valid when the gateway lowers ``max_tokens``, and mapped
to an OpenAI-format upstream's reasoning controls (pure)."""

from __future__ import annotations

from typing import Any

__all__ = ["MIN_THINKING_BUDGET", "fit_thinking_budget", "openai_reasoning"]

# Anthropic's smallest accepted thinking budget.
MIN_THINKING_BUDGET = 1024
INTERLEAVED_BETA = "interleaved-thinking-"


def fit_thinking_budget(req: dict[str, Any], asked: int, max_tokens: int, betas: str) -> None:
    """Keep ``thinking.budget_tokens`` below a ``max_tokens`` the gateway lowered from ``asked``.

    Anthropic requires budget < max_tokens unless interleaved thinking is on. The budget is scaled
    with the cap (a valid request stays valid and keeps its share of room for the answer); one that
    would fall under Anthropic's minimum drops thinking rather than send a request it refuses."""
    thinking = req.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < max_tokens:
        return
    if INTERLEAVED_BETA in betas:
        return
    new_budget = min(budget * max_tokens // max(asked, 1), max_tokens - 1)
    if new_budget < MIN_THINKING_BUDGET:
        del req["thinking"]
    else:
        req["thinking"] = {**thinking, "budget_tokens": new_budget}


# What each style accepts as an effort. DeepSeek takes the whole ladder (it maps minimal/low to low,
# medium/high/xhigh to high, max/ultra to max); OpenAI's reasoning_effort stops at high.
_DEEPSEEK_EFFORTS = ("minimal", "low", "medium", "high", "xhigh", "max", "ultra")
_OPENAI_EFFORTS = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _effort_from_budget(budget: Any) -> str:
    if not isinstance(budget, int) or isinstance(budget, bool):
        return "medium"
    if budget < 4096:
        return "low"
    if budget < 16384:
        return "medium"
    return "high"


def openai_reasoning(body: dict[str, Any], style: str) -> dict[str, Any]:
    """Anthropic ``thinking`` and ``output_config.effort`` -> the upstream's fields for ``style``:
    ``deepseek`` (its ``thinking`` switch plus ``reasoning_effort``), ``openai``
    (``reasoning_effort``), else nothing."""
    if style == "none":
        return {}
    thinking = body.get("thinking")
    thinking = thinking if isinstance(thinking, dict) else {}
    kind = thinking.get("type")
    config = body.get("output_config")
    asked = config.get("effort") if isinstance(config, dict) else None
    if kind == "disabled":
        return {"thinking": {"type": "disabled"}} if style == "deepseek" else {}
    if kind in ("enabled", "adaptive") and not isinstance(asked, str):
        asked = _effort_from_budget(thinking.get("budget_tokens")) if kind == "enabled" else None
    out: dict[str, Any] = {}
    if style == "deepseek":
        if kind in ("enabled", "adaptive"):
            out["thinking"] = {"type": "enabled"}
        if asked in _DEEPSEEK_EFFORTS:
            out["reasoning_effort"] = asked
    elif isinstance(asked, str) and asked in _OPENAI_EFFORTS:
        out["reasoning_effort"] = _OPENAI_EFFORTS[asked]
    elif kind in ("enabled", "adaptive"):
        out["reasoning_effort"] = "high"
    return out
