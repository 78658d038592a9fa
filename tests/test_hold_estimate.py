"""End-to-end: holds sized on the byte bound never refuse, shorten or bill what the exact count allows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import tokens
from gateway.estimate import estimate_prompt
from ledger.keys import Keyspace
from tests.fakes.upstream import FakeUpstream, Script
from tests.gateway_harness import Gateway, running_gateway

REPO = Path(__file__).resolve().parent.parent
CODE = "".join(p.read_text() for p in sorted((REPO / "gateway").glob("*.py")))[:24_000]  # ~4 bytes a token: bound ~4x the count
MISS, OUT = 3, 12  # gpt-test, micro-units per token


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


@pytest.fixture
async def gw(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake) as g:
        yield g


def _body(max_tokens: int) -> dict[str, Any]:
    return {"model": "gpt-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": CODE}]}


def _counts() -> tuple[int, int]:
    tokens.load_encoding()
    body = _body(1)
    return tokens.count_openai_request(body), estimate_prompt(body, "openai").bound


async def _key_with(gw: Gateway, micro: int, email: str) -> tuple[str, str]:
    key = await gw.funded_key(None, email=email)
    account = await gw.account_of(key)
    await gw.ledger.credit(account, micro, reference=f"grant-{email}", source="grant")
    return key, account


async def test_a_balance_the_bound_exceeds_but_the_count_fits_gets_the_full_answer(
    gw: Gateway, fake: FakeUpstream
) -> None:
    exact, bound = _counts()
    assert bound > 3 * exact
    balance = exact * MISS + 4096 * OUT + 1_000
    assert balance < bound * MISS + 256 * OUT  # the bound alone would refuse even the minimum
    key, account = await _key_with(gw, balance, "fits@example.com")
    async with gw.http.post(gw.url + "/v1/chat/completions", json=_body(4096), headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert fake.requests[-1].body["max_tokens"] == 4096  # not shortened either
    rows = await gw.settled()
    bal = await gw.ledger.balance(account)
    assert (bal.available_micro, bal.reserved_micro) == (balance - rows[0]["charge_micro"], 0)
    await gw.reconcile_ok()


async def test_a_thin_balance_lowers_max_tokens_by_the_exact_count_not_the_bound(
    gw: Gateway, fake: FakeUpstream
) -> None:
    exact, bound = _counts()
    balance = exact * MISS + 1_000 * OUT
    assert balance < bound * MISS + 256 * OUT
    key, _ = await _key_with(gw, balance, "thin@example.com")
    async with gw.http.post(gw.url + "/v1/chat/completions", json=_body(4096), headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert fake.requests[-1].body["max_tokens"] == 1_000
    # Too little even for the exact count plus the minimum useful output: 402, nothing sent.
    broke, _ = await _key_with(gw, exact * MISS + 100 * OUT, "broke@example.com")
    sent = len(fake.requests)
    async with gw.http.post(gw.url + "/v1/chat/completions", json=_body(4096), headers={"Authorization": f"Bearer {broke}"}) as r:
        assert r.status == 402
        err = (await r.json())["error"]
    assert err["needed_micro"] == exact * MISS + 256 * OUT  # the exact figure, not the bound's
    assert len(fake.requests) == sent
    await gw.reconcile_ok()


async def test_no_usage_from_the_upstream_bills_the_exact_count_not_the_bound(
    gw: Gateway, fake: FakeUpstream
) -> None:
    exact, _ = _counts()
    fake.script = Script(text="short answer", usage=None)
    key = await gw.funded_key(100)
    async with gw.http.post(gw.url + "/v1/chat/completions", json=_body(100), headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    rows = await gw.settled()
    assert rows[0]["estimated"] == 1
    assert rows[0]["input_cache_miss_tokens"] == exact
    await gw.reconcile_ok()


async def test_an_upstream_reporting_more_input_than_held_is_charged_within_the_balance(
    gw: Gateway, fake: FakeUpstream
) -> None:
    # The upstream's tokenizer is not cl100k: it may report more than even the bound. The overrun is
    # drawn from what is left, then recorded as a shortfall; the balance never goes below zero.
    from tests.fakes.upstream import FakeUsage

    _, bound = _counts()
    fake.script = Script(text="ok", usage=FakeUsage(input_cache_miss=bound * 3, output=10))
    balance = bound * MISS + 300 * OUT
    key, account = await _key_with(gw, balance, "over@example.com")
    async with gw.http.post(gw.url + "/v1/chat/completions", json=_body(256), headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    rows = await gw.settled()
    assert rows[0]["charge_micro"] == balance
    assert rows[0]["shortfall_micro"] == bound * 3 * MISS + 10 * OUT - balance
    bal = await gw.ledger.balance(account)
    assert (bal.available_micro, bal.reserved_micro) == (0, 0)
    await gw.reconcile_ok()
