"""One request's bookkeeping (ids and counts only, never content) and the bill made from it: the
charge and the metering row to settle, now, without leaving the loop (a cancelled settlement), or as
a live stream's progress note (what it would cost if its process died now)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ledger.money import iso_ms
from ledger.spool import Spooled

from . import tokens
from .estimate import PromptEstimate
from .formats import ClientFormat, Route
from .models import Model, Prices
from .translate import ToolNameMap
from .usage import Usage, UsageTracker, charge_micro

__all__ = ["Counted", "Exchange", "bill_for", "bill_now", "progress_note"]


@dataclass(slots=True)
class Exchange:
    """One request's bookkeeping: ids and counts only, never content."""

    request_id: str
    account_id: str
    key_id: str
    model: Model
    client_model: str  # the name the client sent (an alias, perhaps): echoed back
    client: ClientFormat
    route: Route
    stream: bool
    include_usage: bool
    prompt: PromptEstimate
    max_tokens: int
    started_ms: int
    prices: Prices
    status: str = "ok"
    produced: bool = False
    tracker: UsageTracker = field(init=False)
    names: ToolNameMap = field(default_factory=ToolNameMap)
    body: dict[str, Any] = field(default_factory=dict)  # the client's request, for reply translators
    route_state: Any = None  # what the route's request builder left for its reply translators

    def __post_init__(self) -> None:
        self.tracker = UsageTracker(self.model.provider.format)

    @property
    def upstream_fmt(self) -> str:
        return self.model.provider.format



Counted = tuple[int, int, str]


def _word_boundary(text: str, *, longest_word: int = 2048) -> int:
    """Where `text` may be cut so that counting both sides adds up to counting the whole: before the
    last whitespace that follows a non-space (the tokenizer's words start with their space). A text
    without one is cut at its end once it is long (CJK), overcounting by a token at most."""
    for i in range(len(text) - 1, 0, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return len(text) if len(text) > longest_word else 0


async def bill_for(ex: Exchange, now_ms: Callable[[], int], *, status: str | None = None) -> Spooled:
    """What to settle for the exchange now: its charge and metering row (ids and counts only)."""
    # Nothing produced and nothing reported (the upstream refused, or the client left first):
    # an all-zero usage, so the row records the request and the hold goes back in full.
    usage, estimated = Usage(), False
    if ex.produced or ex.tracker.usage is not None:
        # The exact prompt count only when the upstream did not say how much input it read.
        prompt = await ex.prompt.exact() if ex.tracker.needs_prompt_estimate else 0
        usage, estimated = await ex.tracker.result_async(prompt)
    return _bill(ex, now_ms, usage, estimated, status)


async def progress_note(ex: Exchange, now_ms: Callable[[], int], counted: Counted) -> tuple[Spooled, Counted]:
    """What a live stream would be billed if its process died now (status `interrupted`).
    Counts only the output since the previous note: `counted` = (pieces read, tokens counted,
    the text after the last word boundary, not counted yet: a token may straddle two pieces)."""
    pieces, output, carry = counted
    usage, estimated = Usage(), False
    if ex.produced or ex.tracker.usage is not None:
        text, pieces = ex.tracker.pieces_after(pieces)
        text = carry + text
        cut = _word_boundary(text)
        if cut:
            output += await tokens.count_text_async(text[:cut])
        carry = text[cut:]
        tail = tokens.count_text(carry) if carry else 0
        prompt = await ex.prompt.exact() if ex.tracker.needs_prompt_estimate else 0
        usage, estimated = ex.tracker.result_given(prompt, output + tail)
    return _bill(ex, now_ms, usage, estimated, "interrupted"), (pieces, output, carry)


def bill_now(ex: Exchange, now_ms: Callable[[], int], *, status: str | None = None) -> Spooled:
    """`bill_for` without leaving the loop (the output is counted here): for a cancelled settlement."""
    usage, estimated = Usage(), False
    if ex.produced or ex.tracker.usage is not None:
        prompt = ex.prompt.exact_now() if ex.tracker.needs_prompt_estimate else 0
        usage, estimated = ex.tracker.result(prompt)
    return _bill(ex, now_ms, usage, estimated, status)


def _bill(ex: Exchange, now_ms: Callable[[], int], usage: Usage, estimated: bool, status: str | None) -> Spooled:
    model = ex.model
    p = ex.prices
    charge = charge_micro(usage, hit=p.hit, miss=p.miss, out=p.out, write=p.write)
    finished = now_ms()
    metering = {
        "request_id": ex.request_id,
        "key_id": ex.key_id,
        "model": model.name,
        "provider": model.provider.name,
        "upstream_model": model.upstream_model,
        "input_cache_hit_tokens": usage.input_cache_hit,
        "input_cache_miss_tokens": usage.metered_miss,  # cache writes included (SPEC 7)
        "cache_write_tokens": usage.cache_write,
        "output_tokens": usage.output,
        "status": status or ex.status,
        "estimated": estimated,
        "started_at": iso_ms(ex.started_ms),
        "finished_at": iso_ms(finished),
        "latency_ms": finished - ex.started_ms,
    }
    return Spooled(ex.account_id, ex.request_id, charge, metering)
