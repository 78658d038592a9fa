"""Usage extraction from real upstream streams and bodies, the no-usage fallback, and the charge."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import tokens
from gateway.sse import SSEParser
from gateway.usage import Usage, UsageTracker, charge_micro
from tests.fakes.upstream import FakeToolCall, FakeUpstream, FakeUsage, Script, fake_upstream, usage_for

__all__ = ["fake_upstream"]  # the fixture, imported for pytest

OPENAI_BODY: dict[str, Any] = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
RICH = Script(
    reasoning="First I think about it.",
    text="Here is the answer you wanted.",
    tool_calls=(FakeToolCall("bash", '{"command": "ls -la"}'), FakeToolCall("read", '{"path": "x.py"}')),
    usage=FakeUsage(input_cache_hit=300, input_cache_miss=700, output=55, cache_write=120),
)


@pytest.fixture(autouse=True)
def _loaded() -> None:
    tokens.load_encoding()


async def _track(fake: FakeUpstream, api: str, body: dict[str, Any]) -> UsageTracker:
    """Read a real response from the fake the way the proxy will, feeding a tracker."""
    fmt: Literal["openai", "anthropic"] = "anthropic" if api == "anthropic" else "openai"
    tracker = UsageTracker(fmt)
    path = "/v1/messages" if fmt == "anthropic" else "/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(fake.url + path, json=body) as resp:
        if not body.get("stream"):
            tracker.observe_response(orjson.loads(await resp.read()))
            return tracker
        parser = SSEParser()
        try:
            async for piece in resp.content.iter_any():
                for event in parser.feed(piece):
                    if event.data == b"[DONE]":
                        continue
                    if fmt == "anthropic":
                        tracker.observe_event(event.event, orjson.loads(event.data))
                    else:
                        tracker.observe_chunk(orjson.loads(event.data))
        except aiohttp.ClientPayloadError:
            pass  # a cut stream: the tracker keeps what it saw
    return tracker


@pytest.mark.parametrize("flavour", ["openai", "deepseek"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_openai_format_usage_matches_what_the_upstream_sent(
    fake_upstream: FakeUpstream, flavour: Literal["openai", "deepseek"], stream: bool, include_usage: bool
) -> None:
    script = replace(RICH, flavour=flavour)
    fake_upstream.script = script
    body: dict[str, Any] = {**OPENAI_BODY, "stream": stream}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    tracker = await _track(fake_upstream, "openai", body)
    expected = usage_for(script, "openai", stream=stream, include_usage=include_usage)
    assert tracker.usage == expected
    assert tracker.complete == (expected is not None)
    assert tracker.finish_reason == "tool_calls"
    if expected is not None:
        assert expected == Usage(input_cache_hit=300, input_cache_miss=820, output=55, cache_write=0)


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_usage_matches_what_the_upstream_sent(
    fake_upstream: FakeUpstream, stream: bool
) -> None:
    fake_upstream.script = RICH
    tracker = await _track(fake_upstream, "anthropic", {**ANTHROPIC_BODY, "stream": stream})
    assert tracker.usage == Usage(input_cache_hit=300, input_cache_miss=700, output=55, cache_write=120)
    assert tracker.usage == usage_for(RICH, "anthropic", stream=stream)
    assert tracker.complete
    assert tracker.stop_reason == "tool_use"
    assert tracker.usage is not None and tracker.usage.metered_miss == 820
    result = tracker.result(prompt_estimate=5)
    assert result.usage == tracker.usage and not result.estimated


async def test_complete_usage_never_tokenizes(
    fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no encoding loaded any count raises, so passing proves the happy path never counts.
    monkeypatch.setattr(tokens._holder, "encoding", None)
    fake_upstream.script = RICH
    tracker = await _track(fake_upstream, "anthropic", {**ANTHROPIC_BODY, "stream": True})
    assert tracker.result(prompt_estimate=1).estimated is False
    assert (await tracker.result_async(prompt_estimate=1)).estimated is False
    with pytest.raises(RuntimeError):
        tracker.estimated_output_tokens()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_no_usage_falls_back_to_counting_the_streamed_output(
    fake_upstream: FakeUpstream, api: str
) -> None:
    script = replace(RICH, usage=None)
    fake_upstream.script = script
    body = {**(ANTHROPIC_BODY if api == "anthropic" else OPENAI_BODY), "stream": True}
    tracker = await _track(fake_upstream, api, body)
    assert tracker.usage is None and not tracker.complete
    outputs = [script.reasoning, script.text] + [p for c in script.tool_calls for p in (c.name, c.arguments)]
    expected_output = tokens.count_text("".join(outputs))
    assert tracker.estimated_output_tokens() == expected_output
    result = tracker.result(prompt_estimate=1234)
    assert result.estimated
    assert result.usage == Usage(input_cache_hit=0, input_cache_miss=1234, output=expected_output)
    assert await tracker.result_async(prompt_estimate=1234) == result


async def test_cut_anthropic_stream_keeps_exact_input_and_estimates_output(
    fake_upstream: FakeUpstream,
) -> None:
    # message_start, ping, thinking start, 2 thinking deltas, signature, stop, text start, 1 text delta: cut.
    fake_upstream.script = replace(
        RICH, reasoning_chunks=2, text="one two three four", text_chunks=2, die_after=9
    )
    tracker = await _track(fake_upstream, "anthropic", {**ANTHROPIC_BODY, "stream": True})
    assert not tracker.complete
    result = tracker.result(prompt_estimate=99_999)
    assert result.estimated
    seen = RICH.reasoning + "one two t"
    assert result.usage == Usage(
        input_cache_hit=300, input_cache_miss=700, output=tokens.count_text(seen), cache_write=120
    )


async def test_cut_openai_stream_bills_the_estimate(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = replace(
        RICH, die_after=3, reasoning="", text="alpha beta gamma delta", text_chunks=4
    )
    tracker = await _track(
        fake_upstream, "openai", {**OPENAI_BODY, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert tracker.usage is None and tracker.finish_reason is None
    result = tracker.result(prompt_estimate=10)
    assert result == (
        Usage(input_cache_miss=10, output=tokens.count_text("alpha beta g")),
        True,
    )  # role chunk + 2 pieces of 6


async def test_mid_stream_error_type_is_recorded(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script = Script(error_after=3, error_type="overloaded_error")
    tracker = await _track(fake_upstream, "anthropic", {**ANTHROPIC_BODY, "stream": True})
    assert tracker.error_type == "overloaded_error"
    fake_upstream.script = Script(error_after=3)
    tracker = await _track(fake_upstream, "openai", {**OPENAI_BODY, "stream": True})
    assert tracker.error_type == "server_error"


def test_null_and_zero_usage_chunks_are_never_final() -> None:
    tracker = UsageTracker("openai")
    tracker.observe_chunk(
        {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}], "usage": None}
    )
    assert tracker.usage is None and not tracker.complete
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    tracker.observe_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": zero})
    assert tracker.usage is None and not tracker.complete
    assert tracker.finish_reason == "stop"
    real = {"prompt_tokens": 50, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 20}}
    tracker.observe_chunk({"choices": [], "usage": real})
    tracker.observe_chunk({"choices": [], "usage": None})
    assert tracker.usage == Usage(input_cache_hit=20, input_cache_miss=30, output=7)
    assert tracker.complete


def test_deepseek_usage_without_split_counts_prompt_as_miss() -> None:
    tracker = UsageTracker("openai")
    tracker.observe_chunk(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 9,
                "completion_tokens": 1,
                "prompt_cache_hit_tokens": 0,
                "prompt_cache_miss_tokens": 0,
            },
        }
    )
    assert tracker.usage == Usage(input_cache_miss=9, output=1)


def test_cached_tokens_above_prompt_are_clamped() -> None:
    tracker = UsageTracker("openai")
    tracker.observe_response(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 9},
            },
        }
    )
    assert tracker.usage == Usage(input_cache_hit=5, input_cache_miss=0, output=1)


def test_anthropic_message_delta_usage_is_cumulative_not_summed() -> None:
    tracker = UsageTracker("anthropic")
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 100,
                "cache_read_input_tokens": 40,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            }
        },
    }
    tracker.observe_event("message_start", start)
    assert tracker.usage == Usage(input_cache_hit=40, input_cache_miss=100, output=1) and not tracker.complete
    tracker.observe_event(
        "message_delta",
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 10}},
    )
    tracker.observe_event(
        "message_delta",
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 25}},
    )
    assert tracker.usage == Usage(input_cache_hit=40, input_cache_miss=100, output=25)
    assert tracker.stop_reason == "max_tokens" and tracker.complete


def test_anthropic_message_delta_may_restate_input_counts() -> None:
    tracker = UsageTracker("anthropic")
    tracker.observe_event(
        None, {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}}
    )
    delta_usage = {
        "input_tokens": 3,
        "cache_read_input_tokens": 500,
        "cache_creation_input_tokens": None,
        "output_tokens": 8,
    }
    tracker.observe_event(
        None, {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}
    )
    assert tracker.usage == Usage(input_cache_hit=500, input_cache_miss=3, output=8)


@pytest.mark.parametrize(
    "obj",
    [
        {"choices": "x"},
        {"choices": [None]},
        {"choices": [{"delta": {"tool_calls": [None]}}]},
        {"usage": "x"},
        {"usage": {"prompt_tokens": "many", "completion_tokens": -5}},
    ],
)
def test_malformed_chunks_are_ignored(obj: dict[str, Any]) -> None:
    tracker = UsageTracker("openai")
    tracker.observe_chunk(obj)
    tracker.observe_response(obj)
    assert tracker.usage is None


def test_malformed_anthropic_events_are_ignored() -> None:
    tracker = UsageTracker("anthropic")
    tracker.observe_event("message_start", {"message": "x"})
    tracker.observe_event("content_block_delta", {"delta": 5})
    tracker.observe_event("message_delta", {"usage": {"output_tokens": "lots"}, "delta": {}})
    tracker.observe_response({"content": [None], "usage": 3})
    assert tracker.usage == Usage()  # a usage object came, its garbage counts bill nothing


# ---- the charge -------------------------------------------------------------------------------


def test_charge_rounds_up_to_the_next_micro_unit() -> None:
    usage = Usage(input_cache_hit=1000, input_cache_miss=2000, output=300)
    # 0.5, 2.0 and 8.0 currency units per 1M tokens (SPEC 3 example) in micro-units.
    price = {"hit": 500_000, "miss": 2_000_000, "out": 8_000_000}
    assert charge_micro(usage, **price) == (1000 * 500_000 + 2000 * 2_000_000 + 300 * 8_000_000) // 1_000_000
    assert charge_micro(Usage(output=1), hit=0, miss=0, out=1) == 1  # a fraction still costs a micro-unit
    assert charge_micro(Usage(), **price) == 0


def test_cache_write_defaults_to_the_miss_price_and_can_differ() -> None:
    usage = Usage(input_cache_miss=1_000_000, cache_write=1_000_000)
    assert charge_micro(usage, hit=1, miss=2_000_000, out=1) == 4_000_000
    assert charge_micro(usage, hit=1, miss=2_000_000, out=1, write=2_500_000) == 4_500_000
    # With the default write price the charge equals SPEC 4's formula over the metered miss count.
    assert charge_micro(usage, hit=1, miss=2_000_000, out=1) == charge_micro(
        Usage(input_cache_miss=usage.metered_miss), hit=1, miss=2_000_000, out=1
    )


def test_negative_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        charge_micro(Usage(output=-5), hit=0, miss=0, out=1)


@given(
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)
def test_charge_is_the_exact_ceiling(
    hit: int, miss: int, out: int, write: int, p_hit: int, p_miss: int, p_out: int, p_write: int
) -> None:
    usage = Usage(input_cache_hit=hit, input_cache_miss=miss, output=out, cache_write=write)
    exact = Fraction(hit * p_hit + miss * p_miss + out * p_out + write * p_write, 1_000_000)
    charged = charge_micro(usage, hit=p_hit, miss=p_miss, out=p_out, write=p_write)
    assert isinstance(charged, int)
    assert charged == math.ceil(exact)


# ---- the passthrough's deferred parsing -------------------------------------------------------


async def _track_as_passthrough(
    fake: FakeUpstream, api: str, body: dict[str, Any], split: int = 0
) -> tuple[UsageTracker, int]:
    """As gateway.relay._passthrough reads a stream: every byte deferred for its text, only the
    events BillingEvents finds parsed as they pass. ``split``: re-cut the bytes into pieces of that
    size (an event split anywhere, marks included). Returns the tracker and how many were parsed."""
    from gateway.relay import BillingEvents

    fmt: Literal["openai", "anthropic"] = "anthropic" if api == "anthropic" else "openai"
    tracker = UsageTracker(fmt)
    billing = BillingEvents(fmt == "openai")
    parsed = 0
    path = "/v1/messages" if fmt == "anthropic" else "/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(fake.url + path, json=body) as resp:
        pieces: list[bytes] = []
        try:
            async for piece in resp.content.iter_any():
                pieces.append(piece)
        except aiohttp.ClientPayloadError:
            pass
    if split:
        whole = b"".join(pieces)
        pieces = [whole[i : i + split] for i in range(0, len(whole), split)]
    for piece in pieces:
        tracker.defer(piece)
        for event in billing.feed(piece):
            if event.data == b"[DONE]":
                continue
            parsed += 1
            if fmt == "anthropic":
                tracker.observe_event(event.event, orjson.loads(event.data), pieces=False)
            else:
                tracker.observe_chunk(orjson.loads(event.data), pieces=False)
    return tracker, parsed


@pytest.mark.parametrize("api", ["openai", "deepseek", "anthropic"])
@pytest.mark.parametrize("end", ["whole", "cut", "error"])
@pytest.mark.parametrize("usage", [True, False])
async def test_deferred_parsing_bills_what_parsing_every_event_bills(
    fake_upstream: FakeUpstream, api: str, end: str, usage: bool
) -> None:
    # ~400 text frames: past DEFER_LIMIT, so deferred text is also read while the stream goes on.
    script = replace(
        RICH, flavour="deepseek" if api == "deepseek" else "openai", text="word " * 3000, text_chunks=400
    )
    if end == "cut":
        script = replace(script, die_after=200)
    elif end == "error":
        script = replace(script, error_after=200)
    if not usage:
        script = replace(script, usage=None)
    fake_upstream.script = script
    body = {**(ANTHROPIC_BODY if api == "anthropic" else OPENAI_BODY), "stream": True}
    if api != "anthropic":
        body["stream_options"] = {"include_usage": True}
    every = await _track(fake_upstream, api, body)
    fake_upstream.script = script
    for split in (0, 1, 7, 64):
        fake_upstream.script = script
        deferred, parsed = await _track_as_passthrough(fake_upstream, api, body, split)
        assert deferred.result(1234) == every.result(1234), split
        assert deferred.complete == every.complete and deferred.error_type == every.error_type
        assert deferred.pieces_after(0) == every.pieces_after(0)  # the same text, in the same order
        assert parsed <= 4  # the message start, the usage, the end, an error: never the ~400 text deltas


def test_deferred_text_is_bounded_in_memory() -> None:
    from gateway.usage import DEFER_LIMIT

    tracker = UsageTracker("openai")
    chunk = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 100}}]}) + b"\n\n"
    for _ in range(2000):
        tracker.defer(chunk)
        assert tracker._deferred_bytes <= DEFER_LIMIT
    assert tracker.estimated_output_tokens() == tokens.count_text("x" * 100 * 2000)
