"""Coding-agent traffic for the benches: sessions whose history grows by one tool turn of real source.

Each request of a session resends the whole conversation, as Claude Code, Codex and opencode do: a
system prompt, ~25 tool definitions, then one more tool turn per request (the assistant calls a
read-file tool, the tool answers with ~8 KB of a real Python source file) up to ~400 KB (~100k
tokens), then a new session starts. The corpus is the installed interpreter's own standard library
(.py files, tests left out), so the text has real code's token density, not a repeated sentence.

Two request shapes:

- ``openai``: Chat Completions with ``tools``, assistant ``tool_calls`` and ``role: tool`` answers;
- ``anthropic``: Messages shaped like Claude Code: ``system`` as text blocks with ``cache_control``,
  tools with ``input_schema``, ``tool_use`` / ``tool_result`` turns, and the cache breakpoint moved
  to the newest turn on every request (so a message is not byte-identical to its previous sending).
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["TURN_BYTES", "Corpus", "Session", "session_requests"]

TURN_BYTES = 8 * 1024
MAX_TURNS = 40  # 40 x ~8.5 KB (JSON-escaped) + system and tools: ~400 KB, ~100k tokens
N_TOOLS = 25
MAX_OUTPUT = 128


@dataclass(frozen=True)
class Corpus:
    chunks: tuple[str, ...]  # ~TURN_BYTES each, cut at line ends, in a fixed shuffled order
    prose: str  # English from pydoc's topic texts: the system prompt and tool descriptions

    @classmethod
    def load(cls, seed: int = 13) -> Corpus:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(
            p
            for p in root.rglob("*.py")
            if not {"test", "tests", "site-packages", "idle_test", "lib2to3"} & set(p.relative_to(root).parts)
        )
        chunks: list[str] = []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            piece: list[str] = []
            size = 0
            for line in text.splitlines(keepends=True):
                piece.append(line)
                size += len(line)
                if size >= TURN_BYTES:
                    chunks.append("".join(piece))
                    piece, size = [], 0
        random.Random(seed).shuffle(chunks)
        from pydoc_data import topics  # real English prose, shipped with every CPython

        prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        return cls(tuple(chunks), prose)


def _tools(corpus: Corpus, fmt: str) -> list[dict[str, Any]]:
    tools = []
    pos = 0
    for i in range(N_TOOLS):
        size = 600 + (i * 397) % 1400  # 0.6-2 KB descriptions, like a coding agent's
        desc = corpus.prose[pos : pos + size]
        pos += size
        schema = {
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "description": corpus.prose[pos : pos + 120]},
                "offset": {"type": "integer", "description": "The line number to start reading from"},
                "limit": {"type": "integer", "description": "The number of lines to read"},
                f"option_{i}": {"type": "boolean", "description": corpus.prose[pos + 120 : pos + 200]},
            },
            "required": ["file_path"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        }
        pos += 200
        name = "Read" if i == 0 else f"Tool{i}"
        if fmt == "anthropic":
            tools.append({"name": name, "description": desc, "input_schema": schema})
        else:
            tools.append({"type": "function", "function": {"name": name, "description": desc, "parameters": schema}})
    return tools


class Session:
    """One agent conversation; ``next_body()`` is the next request (one more tool turn each time)."""

    def __init__(self, corpus: Corpus, fmt: str, number: int, model: str) -> None:
        self.fmt = fmt
        self.model = model
        self.number = number
        self.turns = 0
        n = len(corpus.chunks)
        self._chunks = [corpus.chunks[(number * MAX_TURNS + i) % n] for i in range(MAX_TURNS)]
        self._system_text = corpus.prose[60_000:72_000]
        self._tools = _tools(corpus, fmt)
        self._messages: list[dict[str, Any]] = []
        task = f"Session {number}: read the sources one by one and find where the retry logic lives."
        if fmt == "anthropic":
            self._messages.append({"role": "user", "content": [{"type": "text", "text": task}]})
        else:
            self._messages.append({"role": "user", "content": task})

    @property
    def done(self) -> bool:
        return self.turns >= MAX_TURNS

    def _add_turn(self) -> None:
        i = self.turns
        source = self._chunks[i]
        call_id = f"toolu_{self.number:06d}_{i:03d}"
        path = f"/src/project/module_{self.number}_{i}.py"
        thought = f"Reading {path} next to follow the call chain."
        if self.fmt == "anthropic":
            self._messages.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": thought},
                        {"type": "tool_use", "id": call_id, "name": "Read", "input": {"file_path": path}},
                    ],
                }
            )
            self._messages.append(
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": source}]}
            )
        else:
            self._messages.append(
                {
                    "role": "assistant",
                    "content": thought,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": "Read", "arguments": orjson.dumps({"file_path": path}).decode()},
                        }
                    ],
                }
            )
            self._messages.append({"role": "tool", "tool_call_id": call_id, "content": source})
        self.turns += 1

    def next_body(self) -> bytes:
        self._add_turn()
        if self.fmt == "anthropic":
            return self._anthropic_body()
        return orjson.dumps(
            {
                "model": self.model,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": MAX_OUTPUT,
                "tools": self._tools,
                "messages": [{"role": "system", "content": self._system_text}, *self._messages],
            }
        )

    def _anthropic_body(self) -> bytes:
        # Claude Code moves its cache breakpoint to the newest block on every request.
        last = self._messages[-1]
        marked_block = {**last["content"][-1], "cache_control": {"type": "ephemeral"}}
        marked = {**last, "content": [*last["content"][:-1], marked_block]}
        return orjson.dumps(
            {
                "model": self.model,
                "stream": True,
                "max_tokens": MAX_OUTPUT,
                "system": [
                    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
                    {"type": "text", "text": self._system_text, "cache_control": {"type": "ephemeral"}},
                ],
                "tools": self._tools,
                "messages": [*self._messages[:-1], marked],
                "metadata": {"user_id": f"user_bench_session_{self.number}"},
            }
        )


def session_requests(corpus: Corpus, fmt: str, model: str, first_session: int) -> Iterator[bytes]:
    """Bodies of consecutive sessions, endlessly: turn 1..MAX_TURNS of one, then the next."""
    number = first_session
    while True:
        session = Session(corpus, fmt, number, model)
        while not session.done:
            yield session.next_body()
        number += 1
