"""Codex CLI (the real CLI, `codex exec`) through the gateway's Responses API, on both upstream formats.

Configured as the README tells users: a ``model_providers`` entry in ``$CODEX_HOME/config.toml``
with ``base_url = <gateway>/v1``, ``env_key`` and ``wire_api = "responses"`` (Codex has no Chat
Completions mode for custom providers any more). ``--strict-config`` makes Codex refuse any key it
does not know, so every offline setting below is one it reads: ``check_for_update_on_startup``,
``analytics``, ``feedback``, ``otel``, ``history``, and the ``plugins``/``remote_plugin`` features
(with them on, Codex 0.171.0 connects to github.com at start to sync its plugin marketplace).
Retries stay at Codex's defaults, as a user has them: Codex retries a 402 (any status but 400,
429 and 5xx it maps to its own errors) five times, "Reconnecting... n/5", before it shows the
gateway's message; nothing reaches the upstream meanwhile.
Commands run unsandboxed (``danger-full-access``, approval ``never``): the container has no
Landlock/seccomp sandbox to give, and the only command is the fake's ``cat``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from tests.compat.agent_upstream import FINAL_PREFIX
from tests.compat.conftest import remember_sent
from tests.compat.harness import (
    FORMATS,
    MODEL_OF_FORMAT,
    NPM_BIN,
    ClientRun,
    Compat,
    client_binary,
    compat_setup,
    run_client,
)
from tests.compat.test_claude_code import DEEPSEEK_THINKING

pytestmark = pytest.mark.timeout(180)
CLIENT = "Codex CLI"
TIMEOUT = 90.0
KEY_ENV = "CODING_PLAN_API_KEY"

CONFIG = """\
model = "{model}"
model_provider = "gateway"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[model_providers.gateway]
name = "Coding Plan gateway"
base_url = "{base_url}"
env_key = "{key_env}"
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"

[history]
persistence = "none"

[features]
plugins = false
remote_plugin = false
"""


async def run_codex(
    c: Compat,
    fmt: str,
    prompt: str,
    *,
    key: str | None = None,
    json_events: bool = False,
    model: str | None = None,
) -> ClientRun:
    home = c.home()
    codex_home = home / ".codex"
    codex_home.mkdir(exist_ok=True)
    config = CONFIG.format(model=model or MODEL_OF_FORMAT[fmt], base_url=f"{c.gw.url}/v1", key_env=KEY_ENV)
    (codex_home / "config.toml").write_text(config)
    argv = [
        client_binary(NPM_BIN / "codex"),
        "exec", "--strict-config", "--skip-git-repo-check", "--ephemeral", "--color", "never",
    ]  # fmt: skip
    if json_events:
        argv.append("--json")
    argv.append(prompt)
    env = c.env(home, CODEX_HOME=str(codex_home), **{KEY_ENV: key or c.key})
    return await run_client(argv, env=env, cwd=c.project, timeout=TIMEOUT)


def events(run: ClientRun) -> list[dict]:
    out = []
    for line in run.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def responses_requests(c: Compat) -> list:
    return [r for r in c.recorder.requests if r.path == "/v1/responses"]


@pytest.mark.compat(CLIENT, "text")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_text(compat: Compat, fmt: str) -> None:
    run = await run_codex(compat, fmt, "Say hello.")
    assert run.returncode == 0 and compat.marker in run.stdout, run.describe()
    sent = responses_requests(compat)
    assert sent and all(r.status == 200 for r in sent), [
        (r.method, r.path, r.status) for r in compat.recorder.requests
    ]


@pytest.mark.compat(CLIENT, "stream")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_stream(compat: Compat, fmt: str) -> None:
    run = await run_codex(compat, fmt, "Say hello.", json_events=True)
    messages = [
        e["item"].get("text", "")
        for e in events(run)
        if e.get("type") == "item.completed" and isinstance(e.get("item"), dict)
    ]
    assert any(compat.marker in m for m in messages), run.describe()
    assert all(r.body.get("stream") is True for r in responses_requests(compat))


@pytest.mark.compat(CLIENT, "tool round trip")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_round_trip(compat: Compat, fmt: str) -> None:
    run = await run_codex(compat, fmt, compat.read_prompt)
    assert f"{FINAL_PREFIX} {compat.token}" in run.stdout, (
        f"replies={compat.upstream.replies}; {run.describe()}"
    )
    assert any(r.startswith("tool_call:") for r in compat.upstream.replies)
    assert f"final:{compat.token}" in compat.upstream.replies


@pytest.mark.compat(CLIENT, "402 message")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_402_message(compat: Compat, fmt: str) -> None:
    run = await run_codex(compat, fmt, "Say hello.", key=await compat.thin_key())
    assert "credit" in run.flat and "/topup" in run.flat, run.describe()
    statuses = [r.status for r in responses_requests(compat)]
    assert statuses == [402] * len(statuses) and 1 <= len(statuses) <= 6  # its stream_max_retries
    assert not compat.upstream.requests


@pytest.mark.compat(CLIENT, "tool round trip, DeepSeek thinking mode")
@pytest.mark.parametrize("fmt", ["openai"])
async def test_tool_round_trip_deepseek_thinking(
    redis_client: aioredis.Redis,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    fmt: str,
) -> None:
    """DeepSeek in thinking mode answers 400 unless a tool turn carries its reasoning_content back."""
    async with compat_setup(redis_client, clean_keyspace, tmp_path, extra_models=DEEPSEEK_THINKING) as c:
        c.upstream.flavour = "deepseek"
        c.upstream.reasoning = "The user wants the file; read it first."
        run = await run_codex(c, fmt, c.read_prompt, model="deepseek-think")
        remember_sent(request, c)
        assert f"{FINAL_PREFIX} {c.token}" in run.stdout, f"replies={c.upstream.replies}; {run.describe()}"
        tool_turn = c.upstream.requests[-1].body
        assistant = [m for m in tool_turn["messages"] if m.get("role") == "assistant" and m.get("tool_calls")]
        assert assistant, tool_turn["messages"]
        # Codex sends no reasoning effort, so the gateway leaves DeepSeek's thinking switch alone;
        # its reasoning item still comes back as the tool turn's reasoning_content.
        assert assistant[0].get("reasoning_content") == c.upstream.reasoning
