"""Incremental stream translators: each takes one parsed upstream event and returns client SSE bytes.

Nothing is buffered beyond what correctness needs (a parallel tool call waiting for the current one
to finish, a stop reason waiting for its usage). Rules follow api-formats 4.4 and 4.5.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.sse import DONE, format_event, format_json_event
from gateway.translate.names import ToolNameMap, sanitize_tool_id
from gateway.translate.responses import SYNTHETIC_SIGNATURE, openai_error_type_for_anthropic
from gateway.translate.stop_reasons import (
    OPENAI_OVERLOADED_FINISH,
    anthropic_stop_reason,
    openai_finish_reason,
)
from gateway.translate.usage import anthropic_usage_to_openai, openai_usage_to_anthropic

__all__ = ["AnthropicToOpenAIStream", "OpenAIToAnthropicStream"]


def _event(event_type: str, payload: dict[str, Any]) -> bytes:
    return format_json_event({"type": event_type, **payload}, event_type)


class _ToolCall:
    """One upstream tool call: its arguments are kept so a waiting call can be replayed whole."""

    __slots__ = ("args", "block", "closed", "id", "name", "sent_delta")

    def __init__(self, call_id: str, name: str) -> None:
        self.id = call_id
        self.name = name
        self.args: list[str] = []
        self.block: int | None = None
        self.closed = False
        self.sent_delta = False

    def args_complete(self) -> bool:
        # Once the arguments parse as a JSON object nothing but whitespace can follow, so the call
        # is over and a waiting parallel call may take its turn.
        text = "".join(self.args).strip()
        if not text.endswith("}"):
            return False
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False


class OpenAIToAnthropicStream:
    """chat.completion.chunk dicts from an OpenAI-format upstream -> Anthropic SSE for the client."""

    def __init__(
        self, *, client_model: str, message_id: str, input_tokens: int, names: ToolNameMap | None = None
    ) -> None:
        self._model = client_model
        self._message_id = message_id
        self._input_tokens = input_tokens
        self._names = names if names is not None else ToolNameMap()
        self._started = False
        self.done = False
        self._next_index = 0
        self._open: str | None = None  # "text" | "thinking" | "tool"
        self._open_index = -1
        self._live: _ToolCall | None = None
        self._by_upstream_index: dict[int, _ToolCall] = {}
        self._pending: list[_ToolCall] = []
        self._last_index = 0
        self._tool_count = 0
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._usage_final = False

    # -- public -------------------------------------------------------------------------------------

    def start(self) -> bytes:
        """``message_start``; at most once, whatever the caller does."""
        if self._started or self.done:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self._input_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return _event("message_start", {"message": message})

    def ping(self) -> bytes:
        """A keep-alive for the client while the upstream is silent."""
        if not self._started or self.done:
            return b""
        return _event("ping", {})

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if self.done:
            return b""
        out = [self.start()]
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else None
            return b"".join(out) + self.error("api_error", str(message or "upstream error"))
        usage = chunk.get("usage")
        has_usage = isinstance(usage, dict) and bool(usage)
        if has_usage:
            self._usage = usage  # latest wins: counts are cumulative, never summed
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0 or self._finish is not None:
                continue  # n is 1; anything after the finish reason is noise
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(self._thinking(reasoning))
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(self._text(content))
            for fragment in delta.get("tool_calls") or []:  # DeepSeek may send [], which means nothing
                if isinstance(fragment, dict):
                    out.append(self._tool_fragment(fragment))
            finish = choice.get("finish_reason")
            if finish:
                out.append(self._on_finish(str(finish)))
        # Usage counts as final only with or after the finish reason: DeepSeek puts it on the finish
        # chunk, OpenAI in a later choices:[] chunk; an earlier usage (or null) is never latched.
        if has_usage and self._finish is not None:
            self._usage_final = True
        if self._finish is not None and self._usage_final and not self.done:
            out.append(self._message_end())
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream ended. After a finish reason: send what is held; before one: an error."""
        if self.done:
            return b""
        out = self.start()
        if self._finish is not None:
            return out + self._message_end()
        return out + self.error("api_error", "upstream stream ended before the answer was complete")

    def error(self, err_type: str, message: str) -> bytes:
        """Close the open block and send ``event: error``; nothing follows it."""
        if self.done:
            return b""
        out = self._close_block()
        self.done = True
        return out + _event("error", {"error": {"type": err_type, "message": message}})

    # -- blocks -------------------------------------------------------------------------------------

    def _open_block(self, kind: str, content_block: dict[str, Any]) -> bytes:
        self._open = kind
        self._open_index = self._next_index
        self._next_index += 1
        return _event("content_block_start", {"index": self._open_index, "content_block": content_block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"index": self._open_index, "delta": delta})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            out += self._delta({"type": "signature_delta", "signature": SYNTHETIC_SIGNATURE})
        elif self._open == "tool" and self._live is not None:
            if not self._live.sent_delta:
                # Claude Code needs at least one input_json_delta per tool_use (LiteLLM #25321).
                out += self._delta({"type": "input_json_delta", "partial_json": "{}"})
            self._live.closed = True
            self._live = None
        out += _event("content_block_stop", {"index": self._open_index})
        self._open = None
        return out

    def _thinking(self, piece: str) -> bytes:
        out = b""
        if self._open != "thinking":
            out += self._close_block()
            out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + self._delta({"type": "thinking_delta", "thinking": piece})

    def _text(self, piece: str) -> bytes:
        out = b""
        if self._open != "text":
            out += self._close_block()
            out += self._open_block("text", {"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": piece})

    # -- tool calls ---------------------------------------------------------------------------------

    def _tool_fragment(self, fragment: dict[str, Any]) -> bytes:
        raw_id = fragment.get("id")
        call_id = raw_id if isinstance(raw_id, str) else ""
        function = fragment.get("function") or {}
        raw_name = function.get("name")
        name = raw_name if isinstance(raw_name, str) else ""
        raw_index = fragment.get("index")
        if isinstance(raw_index, int):
            index = raw_index
        elif call_id and not any(c.id == call_id for c in self._by_upstream_index.values()):
            index = max(self._by_upstream_index, default=-1) + 1  # no index: a new id is a new call
        else:
            index = self._last_index  # no index, no new id: more of the call before
        self._last_index = index
        arguments = function.get("arguments")
        call = self._by_upstream_index.get(index)
        # A new index, or a new id on a known index (ccNexus PR #89), is a new call.
        if call is None or (call_id and call.id and call_id != call.id):
            call = _ToolCall(call_id, name)
            self._by_upstream_index[index] = call
            self._pending.append(call)
        else:
            if call_id and not call.id:
                call.id = call_id
            if name and not call.name:
                call.name = name
        out = b""
        if isinstance(arguments, str) and arguments and not call.closed:
            call.args.append(arguments)
            if call is self._live:
                call.sent_delta = True
                out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        # A fragment for a call already closed cannot be delivered; only a broken upstream sends one.
        if self._pending:
            out += self._advance()
        return out

    def _advance(self) -> bytes:
        """Start waiting calls in arrival order once nothing else holds the stream."""
        out = b""
        while self._pending and self._pending[0].name:
            if self._open == "tool" and self._live is not None and not self._live.args_complete():
                break  # the live call may still get fragments (interleaving upstream): keep waiting
            out += self._close_block()
            out += self._start_tool(self._pending.pop(0))
        return out

    def _start_tool(self, call: _ToolCall) -> bytes:
        self._tool_count += 1
        tool_id = (
            sanitize_tool_id(call.id)
            if call.id
            else f"toolu_{sanitize_tool_id(self._message_id)}_{self._tool_count}"
        )
        block = {"type": "tool_use", "id": tool_id, "name": self._names.to_client(call.name), "input": {}}
        out = self._open_block("tool", block)
        call.block = self._open_index
        self._live = call
        if call.args:
            call.sent_delta = True
            out += self._delta({"type": "input_json_delta", "partial_json": "".join(call.args)})
        return out

    # -- the end ------------------------------------------------------------------------------------

    def _on_finish(self, finish_reason: str) -> bytes:
        self._finish = finish_reason
        out = self._close_block()
        for call in self._pending:  # calls that waited for their turn, whole
            if not call.name:
                continue  # an unnamed call cannot be a tool_use block
            out += self._start_tool(call)
            out += self._close_block()
        self._pending.clear()
        if finish_reason == OPENAI_OVERLOADED_FINISH:
            out += self.error("overloaded_error", "upstream model is overloaded; retry later")
        return out

    def _message_end(self) -> bytes:
        out = self._close_block()
        if self._usage is not None:
            usage = openai_usage_to_anthropic(self._usage)
        else:  # the usage chunk never came: say what is known
            usage = {
                "input_tokens": self._input_tokens,
                "output_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            }
        stop_reason = anthropic_stop_reason(self._finish, made_tool_calls=self._tool_count > 0)
        out += _event(
            "message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": usage}
        )
        out += _event("message_stop", {})
        self.done = True
        return out


class AnthropicToOpenAIStream:
    """Anthropic stream events from an Anthropic-format upstream -> OpenAI chunk SSE for the client."""

    def __init__(
        self,
        *,
        client_model: str,
        completion_id: str,
        include_usage: bool,
        names: ToolNameMap | None = None,
        created: int | None = None,
    ) -> None:
        self._model = client_model
        self._id = completion_id
        self._include_usage = include_usage
        self._names = names if names is not None else ToolNameMap()
        self._created = int(time.time()) if created is None else created
        self._started = False
        self.done = False
        self._sent_done = False
        self._tool_k: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._prefilled: set[int] = set()
        self._stop_reason: str | None = None
        self._usage: dict[str, Any] = {}

    def start(self) -> bytes:
        """Nothing: an OpenAI stream's first chunk waits for the upstream's first event."""
        return b""

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            obj["usage"] = None
        return format_json_event(obj)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._chunk({"role": "assistant", "content": ""})

    def _merge_usage(self, usage: Any) -> None:
        # message_delta usage is cumulative: fields present replace, never add.
        if isinstance(usage, dict):
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    def feed(self, event_type: str | None, data: dict[str, Any]) -> bytes:
        if self.done:
            return b""
        kind = event_type or data.get("type")
        if kind == "message_start":
            if self._started:
                return b""
            self._merge_usage((data.get("message") or {}).get("usage"))
            return self._start()
        if kind == "content_block_start":
            return self._start() + self._block_start(data)
        if kind == "content_block_delta":
            return self._start() + self._block_delta(data)
        if kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop_reason = delta["stop_reason"]
            self._merge_usage(data.get("usage"))
            return b""
        if kind == "message_stop":
            return self._start() + self._end()
        if kind == "error":
            error = data.get("error") or {}
            return self.error(
                str(error.get("type") or "api_error"), str(error.get("message") or "upstream error")
            )
        return b""  # ping, content_block_stop, unknown future events

    def _block_start(self, data: dict[str, Any]) -> bytes:
        block = data.get("content_block") or {}
        index = data.get("index")
        kind = block.get("type")
        if kind == "tool_use" and isinstance(index, int):
            k = len(self._tool_k)
            self._tool_k[index] = k
            name = self._names.to_client(str(block.get("name") or ""))
            call = {
                "index": k,
                "id": str(block.get("id") or ""),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            out = self._chunk({"tool_calls": [call]})
            initial = block.get("input")
            if isinstance(initial, dict) and initial:  # input given whole at the start, not streamed
                self._prefilled.add(index)
                args = json.dumps(initial, ensure_ascii=False)
                out += self._chunk({"tool_calls": [{"index": k, "function": {"arguments": args}}]})
            return out
        if kind == "text" and block.get("text"):
            return self._chunk({"content": block["text"]})
        if kind == "thinking" and block.get("thinking"):
            return self._chunk({"reasoning_content": block["thinking"]})
        return b""

    def _block_delta(self, data: dict[str, Any]) -> bytes:
        delta = data.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return self._chunk({"content": delta["text"]})
        if kind == "thinking_delta" and delta.get("thinking"):
            return self._chunk({"reasoning_content": delta["thinking"]})
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = data.get("index")
            if isinstance(index, int) and index in self._tool_k and index not in self._prefilled:
                piece = {"index": self._tool_k[index], "function": {"arguments": delta["partial_json"]}}
                return self._chunk({"tool_calls": [piece]})
        return b""  # signature_delta, citations_delta, deltas of server-tool blocks

    def _end(self) -> bytes:
        out = self._chunk({}, openai_finish_reason(self._stop_reason))
        if self._include_usage:
            out += format_json_event(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": anthropic_usage_to_openai(self._usage),
                }
            )
        self.done = True
        self._sent_done = True
        return out + format_event(DONE)

    def finish(self) -> bytes:
        """The upstream ended: ``data: [DONE]`` if not sent yet, after an error chunk if it ended early."""
        if self._sent_done:
            return b""
        out = b""
        if not self.done:
            out += self.error("api_error", "upstream stream ended before the answer was complete")
        self._sent_done = True
        return out + format_event(DONE)

    def error(self, err_type: str, message: str) -> bytes:
        """``data: {"error": ...}``; no content follows (``finish()`` still closes with [DONE])."""
        if self.done:
            return b""
        self.done = True
        openai_type, code = openai_error_type_for_anthropic(err_type)
        return format_json_event(
            {"error": {"message": message, "type": openai_type, "param": None, "code": code}}
        )
