"""Fixtures and hooks of the real-clients suite: a gateway per test, the matrix written at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from tests.compat.harness import Compat, compat_setup
from tests.compat.matrix import DOC, Results, render, summarize_detail

RESULTS = pytest.StashKey[Results]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compat(client, capability): a cell of the compatibility matrix")
    config.stash[RESULTS] = Results()


@pytest.fixture
def redis_kind() -> str:
    """Real clients need a real gateway: real Redis only (no fakeredis variant here)."""
    return "redis"


@pytest.fixture
async def compat(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Compat]:
    async with compat_setup(redis_client, clean_keyspace, tmp_path) as c:
        yield c
        remember_sent(request, c)


def remember_sent(request: pytest.FixtureRequest, c: Compat) -> None:
    marker = request.node.get_closest_marker("compat")
    callspec = getattr(request.node, "callspec", None)
    fmt = callspec.params.get("fmt", "openai") if callspec is not None else "openai"
    if marker is not None:
        results = request.config.stash[RESULTS]
        results.sent.setdefault((marker.args[0], fmt), []).extend(c.recorder.requests)
        results.outbound.setdefault(marker.args[0], set()).update(c.trap.attempts)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    report = yield
    marker = item.get_closest_marker("compat")
    callspec = getattr(item, "callspec", None)
    if marker is None or (report.when != "call" and report.passed):
        return report
    fmt = callspec.params.get("fmt", "openai") if callspec is not None else "openai"
    outcome = "pass" if report.passed else ("fail" if report.when == "call" else "error")
    detail = "" if report.passed else summarize_detail(report.longrepr)
    item.config.stash[RESULTS].record(marker.args[0], marker.args[1], fmt, outcome, detail)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    results = session.config.stash.get(RESULTS, None)
    if results is not None and results.complete():
        DOC.write_text(render(results))
