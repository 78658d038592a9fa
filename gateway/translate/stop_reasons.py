"""Stop reason <-> finish reason tables (api-formats 4.2); every known value has a row."""

from __future__ import annotations

__all__ = [
    "ANTHROPIC_TO_OPENAI_FINISH",
    "OPENAI_OVERLOADED_FINISH",
    "OPENAI_TO_ANTHROPIC_STOP",
    "anthropic_stop_reason",
    "openai_finish_reason",
]

OPENAI_TO_ANTHROPIC_STOP: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# DeepSeek ends a choice with this when it ran out of capacity: not a stop, an overloaded error.
OPENAI_OVERLOADED_FINISH = "insufficient_system_resource"

ANTHROPIC_TO_OPENAI_FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def anthropic_stop_reason(finish_reason: str | None, *, made_tool_calls: bool) -> str:
    """Anthropic clients break on unknown stop reasons, so anything unexpected becomes end_turn.

    Some OpenAI-compatible upstreams say ``stop`` after tool calls; Claude Code runs tools on
    ``tool_use``, so a turn that made tool calls and stopped normally reports ``tool_use``.
    """
    reason = OPENAI_TO_ANTHROPIC_STOP.get(finish_reason or "stop", "end_turn")
    if made_tool_calls and reason == "end_turn":
        return "tool_use"
    return reason


def openai_finish_reason(stop_reason: str | None) -> str:
    return ANTHROPIC_TO_OPENAI_FINISH.get(stop_reason or "end_turn", "stop")
