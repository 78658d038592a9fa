"""Billing-side usage: what an upstream reported, in our buckets, whatever format the client speaks.

Buckets (SPEC 3, api-formats 4.3), one ``Usage``:

    input_cache_hit   OpenAI prompt_tokens_details.cached_tokens; DeepSeek prompt_cache_hit_tokens;
                      Anthropic cache_read_input_tokens
    input_cache_miss  OpenAI prompt_tokens - cached; DeepSeek prompt_cache_miss_tokens;
                      Anthropic input_tokens. Cache WRITES ARE NOT in here...
    cache_write       ...they are here: Anthropic cache_creation_input_tokens (0 elsewhere).
    output            completion_tokens / output_tokens (reasoning included)

The metering row's ``input_cache_miss_tokens`` is ``Usage.metered_miss`` (miss + write), as SPEC 7
keeps writes inside it; ``charge_micro`` prices the two separately, so a write price equal to the
miss price (the default) gives exactly SPEC 4's formula.

``UsageTracker`` runs once per upstream chunk on the hot path: it reads a few dict keys and keeps
references to the output strings; it tokenizes only on the no-usage fallback, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson

from gateway import tokens
from gateway.sse import DONE, SSEParser

__all__ = ["DEFER_LIMIT", "Usage", "UsageResult", "UsageTracker", "charge_micro"]


@dataclass(slots=True)
class Usage:
    input_cache_hit: int = 0
    input_cache_miss: int = 0  # excludes cache writes
    output: int = 0
    cache_write: int = 0

    @property
    def metered_miss(self) -> int:
        """The metering row's input_cache_miss_tokens: misses plus cache writes (SPEC 7)."""
        return self.input_cache_miss + self.cache_write

    @property
    def total_input(self) -> int:
        return self.input_cache_hit + self.input_cache_miss + self.cache_write


class UsageResult(NamedTuple):
    usage: Usage
    estimated: bool  # True: some bucket came from our own count, mark the metering row so


def charge_micro(usage: Usage, *, hit: int, miss: int, out: int, write: int | None = None) -> int:
    """Charge in micro-units; prices are micro-units per 1M tokens; ``write`` defaults to ``miss``.

    ceil((hit*p_hit + miss*p_miss + write*p_write + out*p_out) / 1_000_000), integers only.
    """
    p_write = miss if write is None else write
    total = (
        usage.input_cache_hit * hit
        + usage.input_cache_miss * miss
        + usage.cache_write * p_write
        + usage.output * out
    )
    if total < 0:
        raise ValueError("negative token count or price")
    return -(-total // 1_000_000)


def _int(value: Any) -> int:
    # Upstream JSON: tolerate a missing, null, float or garbage field without letting it bill.
    if type(value) is int:
        return value if value > 0 else 0
    if isinstance(value, float) and value > 0:
        return int(value)
    return 0


def _openai_usage(raw: dict[str, Any]) -> Usage | None:
    prompt = _int(raw.get("prompt_tokens"))
    output = _int(raw.get("completion_tokens"))
    if "prompt_cache_hit_tokens" in raw or "prompt_cache_miss_tokens" in raw:  # DeepSeek
        hit = _int(raw.get("prompt_cache_hit_tokens"))
        miss = _int(raw.get("prompt_cache_miss_tokens"))
        if not hit and not miss:
            miss = prompt
    else:
        details = raw.get("prompt_tokens_details")
        hit = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        hit = min(hit, prompt)  # cached is a subset of prompt_tokens
        miss = prompt - hit
    if not (hit or miss or output):
        return None  # a zero placeholder is not a report (CLIProxyAPI #3076)
    return Usage(input_cache_hit=hit, input_cache_miss=miss, output=output)


# Bytes of a passthrough stream kept unparsed at most (a few hundred chunks): bounds the memory of a
# long stream's text kept as SSE and JSON rather than as text.
DEFER_LIMIT = 32 * 1024


class UsageTracker:
    """Fed one upstream response (stream events or a whole body); knows its usage and stop reason."""

    __slots__ = (
        "_anthropic_input_seen",
        "_deferred",
        "_deferred_bytes",
        "_final",
        "_pieces",
        "_text_events",
        "_usage",
        "error_type",
        "finish_reason",
        "fmt",
        "stop_reason",
    )

    def __init__(self, fmt: Literal["openai", "anthropic"]) -> None:
        self.fmt = fmt
        self._usage: Usage | None = None
        self._final = False
        self._anthropic_input_seen = False
        # Output text pieces, for the estimate when no usage arrives. Memory only, never logged.
        self._pieces: list[str] = []
        # Passthrough events not parsed yet (their text is needed only without a usage report or
        # for a progress note): parsed in order when it is, or once they pass DEFER_LIMIT bytes.
        self._deferred: list[bytes] = []
        self._deferred_bytes = 0
        self._text_events: SSEParser | None = None  # splits the deferred bytes into events
        self.finish_reason: str | None = None  # OpenAI upstream
        self.stop_reason: str | None = None  # Anthropic upstream
        self.error_type: str | None = None  # an in-stream error's type (never its message)

    @property
    def usage(self) -> Usage | None:
        """The upstream's reported usage so far; None when it reported none."""
        return self._usage

    @property
    def needs_prompt_estimate(self) -> bool:
        """True when ``result`` would bill input from the gateway's own count of the prompt."""
        return not (self._final and self._usage is not None) and not (
            self._usage is not None and self._anthropic_input_seen
        )

    @property
    def complete(self) -> bool:
        """True once the upstream's final usage arrived (OpenAI usage chunk, Anthropic message_delta)."""
        return self._final

    # ---- OpenAI / DeepSeek --------------------------------------------------------------------

    def observe_chunk(self, obj: dict[str, Any], *, pieces: bool = True) -> None:
        """One parsed ``data:`` object of an OpenAI-format stream; ``pieces=False``: its text is
        handed to ``defer`` instead."""
        try:
            self._observe_chunk(obj, pieces)
        except (AttributeError, TypeError):
            pass  # a malformed chunk carries nothing we can bill; the proxy decides if it is fatal

    def _observe_chunk(self, obj: dict[str, Any], pieces: bool = True) -> None:
        choices = obj.get("choices")
        if choices:
            for choice in choices:
                delta = choice.get("delta")
                if delta and pieces:
                    self._observe_openai_delta(delta)
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reason = reason
        raw = obj.get("usage")
        if raw:
            # Finish chunk (DeepSeek) or trailing choices:[] chunk (OpenAI); the latest real one wins.
            usage = _openai_usage(raw)
            if usage is not None:
                self._usage = usage
                self._final = True
        else:
            error = obj.get("error")
            if isinstance(error, dict):
                self.error_type = str(error.get("type") or error.get("code") or "error")

    def _observe_openai_delta(self, delta: dict[str, Any]) -> None:
        pieces = self._pieces
        text = delta.get("content")
        if text:
            pieces.append(text)
        text = delta.get("reasoning_content")
        if text:
            pieces.append(text)
        calls = delta.get("tool_calls")
        if calls:
            for call in calls:
                function = call.get("function")
                if function:
                    name = function.get("name")
                    if name:
                        pieces.append(name)
                    arguments = function.get("arguments")
                    if arguments:
                        pieces.append(arguments)

    # ---- Anthropic ----------------------------------------------------------------------------

    def observe_event(self, event_type: str | None, obj: dict[str, Any], *, pieces: bool = True) -> None:
        """One Anthropic SSE event; ``event_type`` is its ``event:`` line (``obj["type"]`` if None);
        ``pieces=False``: its text is handed to ``defer`` instead."""
        try:
            self._observe_event(event_type, obj, pieces)
        except (AttributeError, TypeError):
            pass  # as in observe_chunk

    def _observe_event(self, event_type: str | None, obj: dict[str, Any], pieces: bool = True) -> None:
        kind = event_type or obj.get("type")
        if kind == "content_block_delta" or kind == "content_block_start":
            if pieces:
                self._anthropic_pieces(kind, obj)
        elif kind == "message_delta":
            delta = obj.get("delta")
            if delta and delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
            raw = obj.get("usage")
            if raw:
                self._observe_anthropic_usage(raw, final=True)
        elif kind == "message_start":
            message = obj.get("message")
            raw = message.get("usage") if message else None
            if raw:
                self._observe_anthropic_usage(raw, final=False)
        elif kind == "error":
            error = obj.get("error")
            self.error_type = str(error.get("type") or "error") if isinstance(error, dict) else "error"

    def _observe_anthropic_usage(self, raw: dict[str, Any], *, final: bool) -> None:
        # message_delta usage is cumulative: each value replaces the last, never adds to it.
        # Newer APIs repeat the input counts there too; take them when present and non-null.
        usage = self._usage if self._usage is not None else Usage()
        has_input = False
        if raw.get("input_tokens") is not None:
            usage.input_cache_miss = _int(raw["input_tokens"])
            has_input = True
        if raw.get("cache_read_input_tokens") is not None:
            usage.input_cache_hit = _int(raw["cache_read_input_tokens"])
            has_input = True
        if raw.get("cache_creation_input_tokens") is not None:
            usage.cache_write = _int(raw["cache_creation_input_tokens"])
            has_input = True
        if raw.get("output_tokens") is not None:
            usage.output = _int(raw["output_tokens"])
        self._anthropic_input_seen = self._anthropic_input_seen or has_input
        self._usage = usage
        if final:
            self._final = True

    # ---- deferred text (passthrough) ----------------------------------------------------------

    def defer(self, chunk: bytes) -> None:
        """Raw bytes of a passthrough stream, for its output text: split into events and parsed only
        if the text is ever needed (no usage report, a progress note), or once DEFER_LIMIT bytes
        wait, in order. Usage, errors and the end are read by the relay as they pass."""
        self._deferred.append(chunk)
        self._deferred_bytes += len(chunk)
        if self._deferred_bytes > DEFER_LIMIT:
            self._read_deferred()

    def _read_deferred(self) -> None:
        deferred = self._deferred
        if not deferred:
            return
        self._deferred = []
        self._deferred_bytes = 0
        if self._text_events is None:
            self._text_events = SSEParser()
        for chunk in deferred:
            for event in self._text_events.feed(chunk):
                if event.data == DONE:
                    continue
                try:
                    obj = orjson.loads(event.data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                try:
                    if self.fmt == "openai":
                        for choice in obj.get("choices") or ():
                            delta = choice.get("delta")
                            if delta:
                                self._observe_openai_delta(delta)
                    else:
                        self._anthropic_pieces(obj.get("type"), obj)
                except (AttributeError, TypeError):
                    continue

    def _anthropic_pieces(self, kind: Any, obj: dict[str, Any]) -> None:
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if delta:
                text = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
                if text:
                    self._pieces.append(text)
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if block:
                text = block.get("text") or block.get("name") or block.get("thinking")
                if text:
                    self._pieces.append(text)

    # ---- non-stream ---------------------------------------------------------------------------

    def observe_response(self, obj: dict[str, Any]) -> None:
        """A whole non-stream response body in this tracker's format."""
        try:
            self._observe_response(obj)
        except (AttributeError, TypeError):
            pass

    def _observe_response(self, obj: dict[str, Any]) -> None:
        if self.fmt == "openai":
            for choice in obj.get("choices") or ():
                message = choice.get("message")
                if message:
                    self._observe_openai_delta(message)
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
            raw = obj.get("usage")
            usage = _openai_usage(raw) if isinstance(raw, dict) else None
            if usage is not None:
                self._usage = usage
                self._final = True
            return
        for block in obj.get("content") or ():
            text = block.get("text") or block.get("thinking")
            if text:
                self._pieces.append(text)
            if block.get("type") == "tool_use":
                self._pieces.append(block.get("name") or "")
                self._pieces.append(orjson.dumps(block.get("input")).decode())
        if obj.get("stop_reason"):
            self.stop_reason = obj["stop_reason"]
        raw = obj.get("usage")
        if isinstance(raw, dict) and raw:
            self._observe_anthropic_usage(raw, final=True)

    # ---- the end ------------------------------------------------------------------------------

    def estimated_output_tokens(self) -> int:
        """Our count of the output seen; for the fallback path only (it tokenizes everything)."""
        self._read_deferred()
        return tokens.count_text("".join(self._pieces))

    async def estimated_output_tokens_async(self) -> int:
        self._read_deferred()
        return await tokens.count_text_async("".join(self._pieces))

    def result(self, prompt_estimate: int) -> UsageResult:
        """The usage to bill: the upstream's if complete, else the best mix with our own counts.

        ``prompt_estimate`` is the gateway's count of the request (gateway.tokens), used only when
        the upstream never said how many input tokens it read. Output falls back to the larger of
        any partial report and our count of the streamed pieces, so a cut stream is still charged.
        """
        if self._final and self._usage is not None:
            return UsageResult(self._usage, False)
        usage = self._partial_input(prompt_estimate)
        reported = self._usage
        usage.output = max(reported.output if reported is not None else 0, self.estimated_output_tokens())
        return UsageResult(usage, True)

    def _partial_input(self, prompt_estimate: int) -> Usage:
        # Anthropic's message_start gives exact input counts even when the stream is cut later.
        reported = self._usage
        if reported is not None and self._anthropic_input_seen:
            return Usage(reported.input_cache_hit, reported.input_cache_miss, 0, reported.cache_write)
        return Usage(input_cache_miss=max(prompt_estimate, 0))

    def pieces_after(self, start: int) -> tuple[str, int]:
        """The output text after the first `start` pieces, and how many pieces there are now: lets a
        progress note count only what is new since the last one (never logged, never stored)."""
        self._read_deferred()
        return "".join(self._pieces[start:]), len(self._pieces)

    def result_given(self, prompt_estimate: int, output_estimate: int) -> UsageResult:
        """``result`` with our count of the output already made (progress notes count it piece by
        piece as the stream goes, instead of the whole text every time)."""
        if self._final and self._usage is not None:
            return UsageResult(self._usage, False)
        usage = self._partial_input(prompt_estimate)
        reported = self._usage
        usage.output = max(reported.output if reported is not None else 0, output_estimate)
        return UsageResult(usage, True)

    async def result_async(self, prompt_estimate: int) -> UsageResult:
        """``result`` with the fallback count off the loop when the output is large."""
        if self._final and self._usage is not None:
            return UsageResult(self._usage, False)
        estimate = await self.estimated_output_tokens_async()
        usage = self._partial_input(prompt_estimate)
        reported = self._usage
        usage.output = max(reported.output if reported is not None else 0, estimate)
        return UsageResult(usage, True)
