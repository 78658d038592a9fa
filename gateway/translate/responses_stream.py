"""Chat chunks -> the Responses API event stream, as OpenAI emits it (Anthropic events come in
through ``responses_stream_anthropic``).

One output item is open at a time, like OpenAI's own streams: reasoning (DeepSeek's
``reasoning_content`` as a reasoning summary), a message, or a tool call. A parallel tool call that
starts while the current call's arguments are not yet a complete JSON object waits, buffered, and
is sent whole when its turn comes (the rule of ``streams.OpenAIToAnthropicStream``). Every event
carries a strictly increasing ``sequence_number``; exactly one terminal event ends the stream:
``response.completed``, ``response.incomplete`` or ``response.failed``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.sse import format_json_event
from gateway.translate.custom_input import InputExtractor, custom_input_from_arguments
from gateway.translate.responses_body import (
    chat_usage_to_responses,
    incomplete_reason,
    output_text_part,
    response_object,
    tool_call_item,
)
from gateway.translate.responses_tools import ResponsesToolMap
from gateway.translate.stop_reasons import OPENAI_OVERLOADED_FINISH

__all__ = ["ChatToResponsesStream"]

# Codex classifies response.failed by error.code (codex-api sse/responses.rs).
_FAILED_CODE = {
    "overloaded_error": "server_is_overloaded",
    "rate_limit_error": "rate_limit_exceeded",
}


class _Call:
    """One upstream tool call; arguments are kept so a waiting call can be sent whole."""

    __slots__ = ("args", "closed", "extractor", "id", "item_id", "name", "output_index", "sent")

    def __init__(self, call_id: str, name: str) -> None:
        self.id = call_id
        self.name = name
        self.args: list[str] = []
        self.closed = False
        self.item_id = ""
        self.output_index = -1
        self.sent: list[str] = []  # the deltas the client got (input text for a custom tool)
        self.extractor: InputExtractor | None = None

    def args_complete(self) -> bool:
        text = "".join(self.args).strip()
        if not text.endswith("}"):
            return False
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False


class ChatToResponsesStream:
    """chat.completion.chunk dicts from an OpenAI-format upstream -> Responses SSE bytes."""

    def __init__(
        self,
        *,
        response_id: str,
        client_model: str,
        tools: ResponsesToolMap | None = None,
        request: dict[str, Any] | None = None,
        input_tokens: int = 0,
        created_at: int | None = None,
    ) -> None:
        self._id = response_id
        self._base = response_id.removeprefix("resp_") or "gateway"
        self._model = client_model
        self._tools = tools if tools is not None else ResponsesToolMap()
        self._request = request
        self._input_tokens = input_tokens
        self._created = int(time.time()) if created_at is None else created_at
        self._seq = 0
        self._started = False
        self.done = False
        self._output: list[dict[str, Any]] = []  # finished items, in output_index order
        self._open: str | None = None  # "reasoning" | "message" | "tool"
        self._open_id = ""
        self._text: list[str] = []
        self._live: _Call | None = None
        self._by_index: dict[int, _Call] = {}
        self._pending: list[_Call] = []
        self._last_index = 0
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._usage_final = False

    # -- framing ------------------------------------------------------------------------------------

    def _event(self, event_type: str, payload: dict[str, Any]) -> bytes:
        frame = format_json_event({"type": event_type, **payload, "sequence_number": self._seq}, event_type)
        self._seq += 1
        return frame

    def _response(
        self, status: str, *, incomplete: str | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        final = status != "in_progress"
        usage = None
        if final:
            if self._usage is not None:
                usage = chat_usage_to_responses(self._usage)
            elif status != "failed":
                usage = chat_usage_to_responses({"prompt_tokens": self._input_tokens})
        return response_object(
            response_id=self._id,
            client_model=self._model,
            created_at=self._created,
            status=status,
            output=list(self._output) if final else [],
            usage=usage,
            request=self._request,
            incomplete=incomplete,
            error=error,
        )

    # -- public -------------------------------------------------------------------------------------

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress``; at most once."""
        if self._started or self.done:
            return b""
        self._started = True
        response = self._response("in_progress")
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def ping(self) -> bytes:
        """A keep-alive comment while the upstream is silent (the Responses stream has no ping event)."""
        return b": keep-alive\n\n" if self._started and not self.done else b""

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
            self._usage = usage  # cumulative: the latest wins
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0 or self._finish is not None:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(self._piece("reasoning", reasoning))
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(self._piece("message", content))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                out.append(self._piece("message", refusal))
            for fragment in delta.get("tool_calls") or []:
                if isinstance(fragment, dict):
                    out.append(self._tool_fragment(fragment))
            finish = choice.get("finish_reason")
            if finish:
                out.append(self._on_finish(str(finish)))
        # Usage counts as final only with or after the finish reason (DeepSeek: same chunk; OpenAI:
        # a later choices:[] chunk).
        if has_usage and self._finish is not None:
            self._usage_final = True
        if self._finish is not None and self._usage_final and not self.done:
            out.append(self._terminal())
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream ended: the terminal event if a finish reason came, else ``response.failed``."""
        if self.done:
            return b""
        out = self.start()
        if self._finish is not None:
            return out + self._terminal()
        return out + self.error("api_error", "upstream stream ended before the answer was complete")

    def error(self, err_type: str, message: str) -> bytes:
        """``response.failed`` (or a lone ``error`` event before the stream started); nothing follows.

        Items still open are left unfinished on purpose: Codex keeps every ``output_item.done``
        in its history, and a retried turn must not inherit half an answer.
        """
        if self.done:
            return b""
        self.done = True
        code = _FAILED_CODE.get(err_type, "server_error")
        if not self._started:
            return self._event("error", {"code": code, "message": message, "param": None})
        failed = self._response("failed", error={"code": code, "message": message})
        return self._event("response.failed", {"response": failed})

    # -- items --------------------------------------------------------------------------------------

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self._base}_{len(self._output)}"

    def _piece(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open != kind:
            out += self._close()
            out += self._open_text_item(kind)
        self._text.append(text)
        index = len(self._output)
        if kind == "reasoning":
            payload = {"item_id": self._open_id, "output_index": index, "summary_index": 0, "delta": text}
            return out + self._event("response.reasoning_summary_text.delta", payload)
        payload = {
            "item_id": self._open_id,
            "output_index": index,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        }
        return out + self._event("response.output_text.delta", payload)

    def _open_text_item(self, kind: str) -> bytes:
        self._open = kind
        self._text = []
        index = len(self._output)
        if kind == "reasoning":
            self._open_id = self._item_id("rs")
            item: dict[str, Any] = {"id": self._open_id, "type": "reasoning", "summary": []}
            part = {"item_id": self._open_id, "output_index": index, "summary_index": 0}
            return self._event(
                "response.output_item.added", {"output_index": index, "item": item}
            ) + self._event(
                "response.reasoning_summary_part.added",
                {**part, "part": {"type": "summary_text", "text": ""}},
            )
        self._open_id = self._item_id("msg")
        item = {
            "id": self._open_id,
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }
        part = {"item_id": self._open_id, "output_index": index, "content_index": 0}
        return self._event("response.output_item.added", {"output_index": index, "item": item}) + self._event(
            "response.content_part.added", {**part, "part": output_text_part("")}
        )

    def _close(self, status: str = "completed") -> bytes:
        if self._open is None:
            return b""
        kind, self._open = self._open, None
        if kind == "tool":
            return self._close_tool(status)
        text = "".join(self._text)
        index = len(self._output)
        item_id = self._open_id
        if kind == "reasoning":
            part = {"item_id": item_id, "output_index": index, "summary_index": 0}
            summary = {"type": "summary_text", "text": text}
            item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": [summary]}
            out = self._event("response.reasoning_summary_text.done", {**part, "text": text})
            out += self._event("response.reasoning_summary_part.done", {**part, "part": summary})
        else:
            part = {"item_id": item_id, "output_index": index, "content_index": 0}
            content = output_text_part(text)
            item = {
                "id": item_id,
                "type": "message",
                "status": status,
                "content": [content],
                "role": "assistant",
            }
            out = self._event("response.output_text.done", {**part, "text": text, "logprobs": []})
            out += self._event("response.content_part.done", {**part, "part": content})
        out += self._event("response.output_item.done", {"output_index": index, "item": item})
        self._output.append(item)
        return out

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
        elif call_id and not any(c.id == call_id for c in self._by_index.values()):
            index = max(self._by_index, default=-1) + 1  # no index: a new id is a new call
        else:
            index = self._last_index
        self._last_index = index
        call = self._by_index.get(index)
        if call is None or (call_id and call.id and call_id != call.id):
            call = _Call(call_id, name)
            self._by_index[index] = call
            self._pending.append(call)
        else:
            if call_id and not call.id:
                call.id = call_id
            if name and not call.name:
                call.name = name
        out = b""
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments and not call.closed:
            call.args.append(arguments)
            if call is self._live:
                out += self._tool_delta(call, arguments)
        if self._pending:
            out += self._advance()
        return out

    def _advance(self) -> bytes:
        out = b""
        while self._pending and self._pending[0].name:
            if self._open == "tool" and self._live is not None and not self._live.args_complete():
                break
            out += self._close()
            out += self._start_tool(self._pending.pop(0))
        return out

    def _start_tool(self, call: _Call) -> bytes:
        index = len(self._output)
        kind = self._tools.resolve(call.name).kind
        call.item_id = self._item_id("ctc" if kind == "custom" else "fc")
        call.output_index = index
        if not call.id:
            call.id = f"call_{self._base}_{index}"
        if kind == "custom":
            call.extractor = InputExtractor()
        item = tool_call_item(self._tools, call.name, item_id=call.item_id, call_id=call.id, arguments=None)
        self._open = "tool"
        self._live = call
        out = self._event("response.output_item.added", {"output_index": index, "item": item})
        if call.args:
            out += self._tool_delta(call, "".join(call.args))
        return out

    def _tool_delta(self, call: _Call, arguments: str) -> bytes:
        base = {"item_id": call.item_id, "output_index": call.output_index}
        if call.extractor is None:
            call.sent.append(arguments)
            return self._event("response.function_call_arguments.delta", {**base, "delta": arguments})
        text = call.extractor.feed(arguments)
        if not text:
            return b""
        call.sent.append(text)
        return self._event("response.custom_tool_call_input.delta", {**base, "delta": text})

    def _close_tool(self, status: str) -> bytes:
        call = self._live
        self._live = None
        if call is None:
            return b""
        call.closed = True
        base = {"item_id": call.item_id, "output_index": call.output_index}
        out = b""
        if call.extractor is None:
            if not call.sent:  # a call without arguments: "{}" keeps the arguments valid JSON
                out += self._tool_delta(call, "{}")
            arguments = "".join(call.sent)
            out += self._event("response.function_call_arguments.done", {**base, "arguments": arguments})
        else:
            arguments = "".join(call.args)
            sent = "".join(call.sent)
            final = sent if call.extractor.started else custom_input_from_arguments(arguments)
            if final != sent and final.startswith(sent):  # what the extractor could not stream
                out += self._event(
                    "response.custom_tool_call_input.delta", {**base, "delta": final[len(sent) :]}
                )
                call.sent.append(final[len(sent) :])
            out += self._event("response.custom_tool_call_input.done", {**base, "input": "".join(call.sent)})
        item = tool_call_item(
            self._tools, call.name, item_id=call.item_id, call_id=call.id, arguments=arguments, status=status
        )
        if item["type"] == "custom_tool_call":
            item["input"] = "".join(call.sent)
        out += self._event("response.output_item.done", {"output_index": call.output_index, "item": item})
        self._output.append(item)
        return out

    # -- the end ------------------------------------------------------------------------------------

    def _on_finish(self, finish_reason: str) -> bytes:
        self._finish = finish_reason
        status = "incomplete" if incomplete_reason(finish_reason) else "completed"
        out = self._close(status)
        for call in self._pending:  # calls that waited for their turn, whole
            if call.name:
                out += self._start_tool(call)
                out += self._close(status)
        self._pending.clear()
        if finish_reason == OPENAI_OVERLOADED_FINISH:
            out += self.error("overloaded_error", "upstream model is overloaded; retry later")
        return out

    def _terminal(self) -> bytes:
        out = self._close()
        self.done = True
        reason = incomplete_reason(self._finish)
        if reason is not None:
            return out + self._event(
                "response.incomplete", {"response": self._response("incomplete", incomplete=reason)}
            )
        return out + self._event("response.completed", {"response": self._response("completed")})
