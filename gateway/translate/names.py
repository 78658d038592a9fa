"""Tool names and tool call ids made acceptable to the other format, deterministically and reversibly."""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_TOOL_NAME_LEN", "ToolNameMap", "sanitize_tool_id"]

# OpenAI function names: [a-zA-Z0-9_-]{1,64}. Claude Code's MCP tools (mcp__server__tool) can be longer.
MAX_TOOL_NAME_LEN = 64
_NAME_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_HASH_LEN = 8


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_LEN]


class ToolNameMap:
    """Remembers which upstream-safe name stands for which client tool name.

    Shortening is a pure function of the name (prefix + hash of the whole name), so the same tool gets
    the same upstream name in every request of a conversation; the map only serves the way back.
    """

    __slots__ = ("_to_client", "_to_upstream")

    def __init__(self) -> None:
        self._to_upstream: dict[str, str] = {}
        self._to_client: dict[str, str] = {}

    def to_upstream(self, name: str) -> str:
        """The name to send upstream for a client tool name; records the pair."""
        known = self._to_upstream.get(name)
        if known is not None:
            return known
        if _NAME_OK.match(name):
            safe = name
        else:
            # Different long names sharing a prefix still differ by their hash suffix.
            prefix = _BAD_CHARS.sub("_", name)[: MAX_TOOL_NAME_LEN - _HASH_LEN - 1]
            safe = f"{prefix}_{_digest(name)}"
        self._to_upstream[name] = safe
        self._to_client[safe] = name
        return safe

    def to_client(self, upstream_name: str) -> str:
        """The client's original name for a name the upstream used (unchanged when not shortened)."""
        return self._to_client.get(upstream_name, upstream_name)

    def __len__(self) -> int:
        return sum(1 for k, v in self._to_upstream.items() if k != v)

    def renamed(self) -> dict[str, str]:
        """Client name -> upstream name, only for names that had to change."""
        return {k: v for k, v in self._to_upstream.items() if k != v}


_ID_OK = re.compile(r"^[A-Za-z0-9_-]+$")


def sanitize_tool_id(tool_id: str) -> str:
    """Anthropic ids must match ``^[A-Za-z0-9_-]+$`` (Kimi sends ``functions.Bash:0``).

    Valid ids pass unchanged; others get their bad characters replaced plus a hash of the original,
    so two ids that differ only in a replaced character stay different.
    """
    if _ID_OK.match(tool_id):
        return tool_id
    if not tool_id:
        return "toolu_empty"
    return f"{_BAD_CHARS.sub('_', tool_id)}_{_digest(tool_id)}"
