"""Translation cost: microseconds per chunk in both directions, and the TTFB a translated stream adds.

    .venv/bin/python bench/translate_bench.py [--streams 200] [--requests 200] [--redis-url URL]

Part 1 replays a realistic 200-frame upstream stream (text, then a tool call streamed in fragments,
finish, usage), recorded from the fake upstream, through exactly what the proxy runs per chunk: the
SSE parser, ``orjson.loads``, and either only the usage tracker (same format) or the tracker plus the
translator (different formats). The difference is the translation's own cost.

Part 2 starts the real gateway (tests.gateway_harness: real HTTP on loopback, the ledger on Redis or
fakeredis, the fake upstream) and sends interleaved streaming requests for each client/upstream pair;
it reports time to the first body byte and to the first text token, p50/p99. Everything runs in one
event loop, so the absolute figures include the load generator and the fake; the translated minus
same-format difference on the same upstream is what translation adds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from gateway.appkeys import BACKGROUND, PROXY  # noqa: E402
from gateway.sse import DONE, SSEParser  # noqa: E402
from gateway.translate import AnthropicToOpenAIStream, OpenAIToAnthropicStream, ToolNameMap  # noqa: E402
from gateway.usage import UsageTracker  # noqa: E402
from ledger.keys import Keyspace  # noqa: E402
from tests.fakes.upstream import FakeToolCall, FakeUpstream, FakeUsage, Script  # noqa: E402
from tests.gateway_harness import Gateway, running_gateway  # noqa: E402

__all__ = ["main"]

# 150 text frames + a tool call (start + 45 argument fragments) + role/finish/usage/[DONE] ~ 200 frames.
TEXT = " ".join(f"token{i}" for i in range(600))
ARGS = orjson.dumps({"path": "src/app/main.py", "content": "x = 1\n" * 60, "mode": "overwrite"}).decode()
STREAM_SCRIPT = Script(
    text=TEXT,
    text_chunks=150,
    tool_calls=(FakeToolCall("write_file", ARGS, id="call_bench_1"),),
    argument_chunks=45,
    usage=FakeUsage(input_cache_hit=2048, input_cache_miss=512, output=700),
)
# Frames 1 ms apart, as a model streams: the first byte and the first text token are distinct moments.
TTFB_SCRIPT = Script(text=" ".join(f"w{i}" for i in range(128)), text_chunks=32, chunk_delay_s=0.001)


# ---- part 1: per-chunk cost ----------------------------------------------------------------------


async def record_streams() -> tuple[bytes, bytes]:
    """The fake upstream's bytes for the bench stream, OpenAI format (with usage) and Anthropic format."""
    async with FakeUpstream(STREAM_SCRIPT) as fake, aiohttp.ClientSession() as http:
        body = {
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": "go"}],
        }
        async with http.post(fake.openai_base_url + "/chat/completions", json=body) as r:
            openai_raw = await r.read()
        async with http.post(fake.anthropic_base_url + "/v1/messages", json=body) as r:
            anthropic_raw = await r.read()
    return openai_raw, anthropic_raw


def split_frames(raw: bytes) -> list[bytes]:
    """The stream as the network delivers it here: one SSE frame per read."""
    return [f + b"\n\n" for f in raw.split(b"\n\n") if f]


def run_openai_upstream(frames: list[bytes], translate: bool) -> int:
    parser = SSEParser()
    tracker = UsageTracker("openai")
    tr = OpenAIToAnthropicStream(client_model="m", message_id="msg_x", input_tokens=10, names=ToolNameMap())
    out = 0
    if translate:
        out += len(tr.start())
    for frame in frames:
        for ev in parser.feed(frame):
            if ev.data == DONE:
                continue
            obj = orjson.loads(ev.data)
            tracker.observe_chunk(obj)
            if translate:
                out += len(tr.feed(obj))
    if translate:
        out += len(tr.finish())
    return out


def run_anthropic_upstream(frames: list[bytes], translate: bool) -> int:
    parser = SSEParser()
    tracker = UsageTracker("anthropic")
    tr = AnthropicToOpenAIStream(
        client_model="m", completion_id="c", include_usage=True, names=ToolNameMap(), created=1
    )
    out = 0
    for frame in frames:
        for ev in parser.feed(frame):
            obj = orjson.loads(ev.data)
            etype = ev.event or obj.get("type", "")
            tracker.observe_event(etype, obj)
            if translate:
                out += len(tr.feed(etype, obj))
    if translate:
        out += len(tr.finish())
    return out


def per_chunk_us(
    run: Callable[[list[bytes], bool], int], frames: list[bytes], translate: bool, streams: int
) -> float:
    """Median over ``streams`` replays of one whole stream, divided by its frame count."""
    run(frames, translate)  # warm up
    times = []
    for _ in range(streams):
        t0 = time.perf_counter()
        run(frames, translate)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(frames) * 1e6


def check_translation(openai_raw: bytes, anthropic_raw: bytes) -> None:
    """The replayed streams are translated whole (so the timing is of real work)."""
    tr = OpenAIToAnthropicStream(client_model="m", message_id="msg_x", input_tokens=10)
    out = tr.start()
    for ev in SSEParser().feed(openai_raw):
        if ev.data != DONE:
            out += tr.feed(orjson.loads(ev.data))
    out += tr.finish()
    assert out.count(b"event: message_stop") == 1 and b'"tool_use"' in out
    back = AnthropicToOpenAIStream(client_model="m", completion_id="c", include_usage=True)
    res = b"".join(back.feed(ev.event, orjson.loads(ev.data)) for ev in SSEParser().feed(anthropic_raw))
    assert res.endswith(b"data: [DONE]\n\n") and b'"tool_calls"' in res


# ---- part 2: TTFB through the gateway -----------------------------------------------------------

FIRST_TEXT = {"anthropic": re.compile(rb'"text_delta"'), "openai": re.compile(rb'"content":"[^"]')}


async def one_request(gw: Gateway, key: str, client: str, model: str) -> tuple[float, float]:
    """(time to first body byte, time to first text token), seconds, as the client sees them."""
    if client == "anthropic":
        url = gw.url + "/v1/messages"
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        url = gw.url + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {key}"}
    body = {
        "model": model,
        "max_tokens": 512,
        "stream": True,
        "messages": [{"role": "user", "content": "Say hi"}],
    }
    payload = orjson.dumps(body)
    headers["Content-Type"] = "application/json"
    pattern = FIRST_TEXT[client]
    t0 = time.perf_counter()
    ttfb = ttft = 0.0
    seen = b""
    async with gw.http.post(url, data=payload, headers=headers) as r:
        assert r.status == 200, r.status
        async for chunk in r.content.iter_any():
            now = time.perf_counter()
            if not ttfb:
                ttfb = now - t0
            if not ttft:
                seen += chunk
                if pattern.search(seen):
                    ttft = now - t0
    assert ttft, "no text arrived"
    return ttfb, ttft


async def idle(gw: Gateway) -> None:
    background = gw.app[BACKGROUND]
    while background or gw.app[PROXY].live:
        await asyncio.sleep(0.0005)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


PAIRS = [  # (label, client format, model); models as in tests.gateway_harness
    ("openai -> openai (same)", "openai", "gpt-test"),
    ("anthropic -> openai (translated)", "anthropic", "gpt-test"),
    ("anthropic -> anthropic (same)", "anthropic", "claude-test"),
    ("openai -> anthropic (translated)", "openai", "claude-test"),
]


async def redis_client(url: str | None) -> Any:
    import redis.asyncio as aioredis

    if url:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            await client.ping()
            return client
        except Exception:
            await client.aclose()
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=True)


async def ttfb_bench(requests: int, redis_url: str | None) -> tuple[str, dict[str, dict[str, list[float]]]]:
    redis = await redis_client(redis_url)
    kind = "fakeredis" if type(redis).__module__.startswith("fakeredis") else "redis"
    keyspace = Keyspace(prefix=f"bench{os.getpid()}", shards=4)
    results: dict[str, dict[str, list[float]]] = {label: {"ttfb": [], "ttft": []} for label, _, _ in PAIRS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with (
                FakeUpstream(TTFB_SCRIPT) as fake,
                running_gateway(redis, keyspace, Path(tmp), fake) as gw,
            ):
                key = await gw.funded_key(100_000)
                for _ in range(10):  # warm up connections and code paths
                    for _, client, model in PAIRS:
                        await one_request(gw, key, client, model)
                rng = random.Random(7)
                for _ in range(requests):
                    # Interleaved in a shuffled order, each request alone: the previous request's
                    # settlement (which runs after the client has its last byte) must not land in
                    # the next one's TTFB, nor always in the same pair's.
                    for label, client, model in rng.sample(PAIRS, len(PAIRS)):
                        await idle(gw)
                        ttfb, ttft = await one_request(gw, key, client, model)
                        results[label]["ttfb"].append(ttfb)
                        results[label]["ttft"].append(ttft)
                await gw.drain()
                fake.reset()
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{keyspace.prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    return kind, results


# ---- main ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    openai_raw, anthropic_raw = await record_streams()
    check_translation(openai_raw, anthropic_raw)
    o_frames, a_frames = split_frames(openai_raw), split_frames(anthropic_raw)
    print(f"Per-chunk cost (median of {args.streams} replays; parse + json + usage, +translate)")
    print(f"{'upstream stream':<34}{'frames':>7}{'same fmt us':>13}{'translated us':>15}{'added us':>10}")
    for name, run_one, frames in (
        ("OpenAI-format -> Anthropic client", run_openai_upstream, o_frames),
        ("Anthropic-format -> OpenAI client", run_anthropic_upstream, a_frames),
    ):
        same = per_chunk_us(run_one, frames, False, args.streams)
        translated = per_chunk_us(run_one, frames, True, args.streams)
        print(f"{name:<34}{len(frames):>7}{same:>13.2f}{translated:>15.2f}{translated - same:>10.2f}")

    kind, results = await ttfb_bench(args.requests, args.redis_url)
    print()
    print(f"Through the gateway ({args.requests} interleaved requests per pair, ledger on {kind}; ms)")
    print(
        f"{'client -> upstream':<34}{'TTFB p50':>10}{'TTFB p99':>10}{'1st text p50':>14}{'1st text p99':>14}"
    )
    p50: dict[str, tuple[float, float]] = {}
    for label, _, _ in PAIRS:
        r = results[label]
        row = [pct(r["ttfb"], 50), pct(r["ttfb"], 99), pct(r["ttft"], 50), pct(r["ttft"], 99)]
        p50[label] = (row[0], row[2])
        print(
            f"{label:<34}"
            + "".join(f"{v * 1000:>{w}.3f}" for v, w in zip(row, (10, 10, 14, 14), strict=True))
        )
    print()
    for moved, direct in ((PAIRS[1][0], PAIRS[0][0]), (PAIRS[3][0], PAIRS[2][0])):
        d_ttfb = (p50[moved][0] - p50[direct][0]) * 1000
        d_ttft = (p50[moved][1] - p50[direct][1]) * 1000
        print(
            f"added by translation, {moved.split(' (')[0]}: TTFB p50 {d_ttfb:+.3f} ms, first text p50 {d_ttft:+.3f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=200, help="replays of the 200-frame stream (part 1)")
    parser.add_argument(
        "--requests", type=int, default=200, help="requests per client/upstream pair (part 2)"
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for the ledger; fakeredis if unreachable",
    )
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
