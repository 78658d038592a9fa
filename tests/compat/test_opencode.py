"""opencode (the real CLI, `opencode run`) through the gateway, on an OpenAI- and an Anthropic-format model.

The provider is configured as the README would tell a user: ``@ai-sdk/openai-compatible`` with
``baseURL = <gateway>/v1`` for the OpenAI format, ``@ai-sdk/anthropic`` with the same ``baseURL``
for the Anthropic format (both SDKs are bundled in opencode's binary, nothing is installed at run
time). Offline: ``OPENCODE_DISABLE_MODELS_FETCH`` (no models.dev catalogue download, read from the
binary's flag table), ``OPENCODE_DISABLE_AUTOUPDATE``, ``OPENCODE_DISABLE_DEFAULT_PLUGINS`` (no npm
plugin install), ``OPENCODE_DISABLE_LSP_DOWNLOAD``, ``autoupdate: false``, ``share: "disabled"``.
One attempt remains: at every start opencode 1.18.33 installs ``@opencode-ai/plugin`` into its
config directory in the background (its Npm.install, no setting turns it off); the proxy trap
refuses it, opencode logs a warning and carries on.
"""

from __future__ import annotations

import json

import pytest

from tests.compat.agent_upstream import FINAL_PREFIX
from tests.compat.harness import (
    FORMATS,
    MODEL_OF_FORMAT,
    NPM_BIN,
    ClientRun,
    Compat,
    client_binary,
    run_client,
)

pytestmark = pytest.mark.timeout(180)
CLIENT = "opencode"
TIMEOUT = 90.0
SDK_OF_FORMAT = {"openai": "@ai-sdk/openai-compatible", "anthropic": "@ai-sdk/anthropic"}


def write_config(c: Compat, fmt: str, key: str) -> None:
    model = MODEL_OF_FORMAT[fmt]
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "gateway": {
                "npm": SDK_OF_FORMAT[fmt],
                "name": "Coding Plan gateway",
                "options": {"baseURL": f"{c.gw.url}/v1", "apiKey": key},
                "models": {model: {"name": model}},
            }
        },
        "model": f"gateway/{model}",
        "small_model": f"gateway/{model}",
        "autoupdate": False,
        "share": "disabled",
    }
    (c.project / "opencode.json").write_text(json.dumps(config, indent=1))


async def run_opencode(
    c: Compat, fmt: str, prompt: str, *, key: str | None = None, json_events: bool = False
) -> ClientRun:
    write_config(c, fmt, key or c.key)
    argv = [client_binary(NPM_BIN / "opencode"), "run"]
    if json_events:
        argv += ["--format", "json"]
    argv.append(prompt)
    env = c.env(
        c.home(),
        OPENCODE_DISABLE_MODELS_FETCH="1",
        OPENCODE_DISABLE_AUTOUPDATE="1",
        OPENCODE_DISABLE_DEFAULT_PLUGINS="1",
        OPENCODE_DISABLE_LSP_DOWNLOAD="1",
        OPENCODE_DISABLE_SHARE="1",
    )
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


def chat_requests(c: Compat) -> list:
    return [r for r in c.recorder.requests if r.path in ("/v1/chat/completions", "/v1/messages")]


@pytest.mark.compat(CLIENT, "text")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_text(compat: Compat, fmt: str) -> None:
    run = await run_opencode(compat, fmt, "Say hello.")
    assert run.returncode == 0 and compat.marker in run.stdout, run.describe()
    sent = chat_requests(compat)
    assert sent and all(r.status == 200 for r in sent), [(r.path, r.status) for r in sent]


@pytest.mark.compat(CLIENT, "stream")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_stream(compat: Compat, fmt: str) -> None:
    run = await run_opencode(compat, fmt, "Say hello.", json_events=True)
    texts = [
        e["part"].get("text", "")
        for e in events(run)
        if e.get("type") == "text" and isinstance(e.get("part"), dict)
    ]
    assert any(compat.marker in t for t in texts), run.describe()
    sent = chat_requests(compat)
    assert sent and all(r.body.get("stream") is True for r in sent)
    if fmt == "openai":  # its auto-compaction needs usage in the stream
        assert all(r.body.get("stream_options", {}).get("include_usage") is True for r in sent)


@pytest.mark.compat(CLIENT, "tool round trip")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_round_trip(compat: Compat, fmt: str) -> None:
    run = await run_opencode(compat, fmt, compat.read_prompt)
    assert f"{FINAL_PREFIX} {compat.token}" in run.stdout, (
        f"replies={compat.upstream.replies}; {run.describe()}"
    )
    assert "tool_call:read" in compat.upstream.replies
    assert f"final:{compat.token}" in compat.upstream.replies


@pytest.mark.compat(CLIENT, "402 message")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_402_message(compat: Compat, fmt: str) -> None:
    run = await run_opencode(compat, fmt, "Say hello.", key=await compat.thin_key())
    assert "credit" in run.flat and "/topup" in run.flat, run.describe()
    assert {r.status for r in chat_requests(compat)} == {402}
    assert not compat.upstream.requests
