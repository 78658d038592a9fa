"""The prompt estimate on coding-agent bodies: CPU of the bound and of the exact count, cache memory.

    .venv/bin/python bench/estimate_bench.py            # ~30 s

In process, one core, no server: the bodies of bench/agent_workload.py (sessions growing by one ~8 KB
tool turn of real source per request to ~400 KB), parsed once as the proxy does, then

- bound: ``estimate_prompt(body).bound``, what every request now pays on the hot path;
- exact, cold: the whole count (what every request paid before: ``tokens.count_*_request``);
- exact, cached: ``PromptEstimate.exact()`` with the count cache warm from the previous turn (what
  a request pays when its hold needs the exact count: a thin balance, no usage from the upstream);

then memory: the count cache after many whole sessions (entries, bytes, per session), and at its
entry limit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_workload import MAX_TURNS, Corpus, Session

from gateway import tokens
from gateway.estimate import DEFAULT_MAX_ENTRIES, TokenCountCache, estimate_prompt

__all__ = ["main"]


def _ms(seconds: list[float]) -> str:
    return f"{statistics.mean(seconds) * 1e3:8.3f}"


async def _cpu(corpus: Corpus, fmt: str, sessions: int) -> None:
    count = tokens.count_anthropic_request if fmt == "anthropic" else tokens.count_openai_request
    cache = TokenCountCache()
    bound_s: list[float] = []
    cold_s: list[float] = []
    cached_s: list[float] = []
    ratio: list[float] = []
    for n in range(sessions):
        session = Session(corpus, fmt, 10_000 + n, "m")
        for _ in range(MAX_TURNS):
            body = orjson.loads(session.next_body())
            t0 = time.process_time()
            prompt = estimate_prompt(body, fmt, cache)
            t1 = time.process_time()
            exact = count(body)
            t2 = time.process_time()
            cached = prompt.exact_now()
            t3 = time.process_time()
            assert cached == exact <= prompt.bound
            bound_s.append(t1 - t0)
            cold_s.append(t2 - t1)
            cached_s.append(t3 - t2)
            ratio.append(prompt.bound / exact)
    print(
        f"{fmt:<9} {_ms(bound_s)} {_ms(cold_s)} {_ms(cached_s)}   "
        f"{statistics.mean(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})"
    )


def _memory(corpus: Corpus, sessions: int) -> None:
    # Sessions on disjoint corpus chunks, so no two share a tool result.
    sessions = min(sessions, len(corpus.chunks) // MAX_TURNS)
    cache = TokenCountCache()
    first = 0
    for n in range(sessions):
        session = Session(corpus, "anthropic", n, "m")
        for _ in range(MAX_TURNS):
            estimate_prompt(orjson.loads(session.next_body()), "anthropic", cache).exact_now()
        if n == 0:
            first = len(cache)
    size = cache.memory_bytes()
    per_entry = size / len(cache)
    per_session = (len(cache) - first) / max(sessions - 1, 1)
    print(
        f"count cache after {sessions} whole sessions of {MAX_TURNS} turns: {len(cache)} entries, "
        f"{size / 2**20:.2f} MiB: {per_entry:.0f} B per entry, {per_session:.0f} entries = "
        f"{per_session * per_entry / 1024:.1f} KiB per session (units under 256 B are not cached; the "
        "system prompt and the tools are one entry each, shared by all sessions)"
    )
    full = TokenCountCache()
    for i in range(DEFAULT_MAX_ENTRIES + 1000):
        full.put(i.to_bytes(16, "little"), 30_000 + i % 1000)
    print(
        f"at its limit: {len(full)} entries (DEFAULT_MAX_ENTRIES), {full.memory_bytes() / 2**20:.1f} MiB, "
        f"whatever the traffic: ~{DEFAULT_MAX_ENTRIES // MAX_TURNS} sessions of {MAX_TURNS} turns "
        "stay fully cached; older ones fall back to the bound, then recount"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/estimate_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=3, help="sessions per format for the CPU figures")
    p.add_argument("--memory-sessions", type=int, default=25, help="whole sessions for the memory figure")
    args = p.parse_args(argv)
    tokens.load_encoding()
    corpus = Corpus.load()
    print(f"ms of CPU per request, mean over {args.sessions} sessions x {MAX_TURNS} turns (prompts ~70-400 KB)")
    print(f"{'shape':<9} {'bound':>8} {'exact':>8} {'cached':>8}   bound/exact")
    for fmt in ("openai", "anthropic"):
        asyncio.run(_cpu(corpus, fmt, args.sessions))
    print()
    _memory(corpus, args.memory_sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
