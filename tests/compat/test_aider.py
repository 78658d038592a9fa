"""aider (the real CLI, `aider --message`) through the gateway, on an OpenAI- and an Anthropic-format model.

aider talks through LiteLLM: ``--model openai/<name>`` with ``--openai-api-base <gateway>/v1``, or
``--model anthropic/<name>`` with ``ANTHROPIC_API_BASE=<gateway>`` (LiteLLM appends /v1/messages).
Offline: ``--no-check-update --no-analytics``, ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (LiteLLM would
download its price list on import), and a ``--model-metadata-file`` naming the model, so that
aider's ModelInfoManager finds it locally and never downloads LiteLLM's model list either.

aider has no tool calling (it edits files through its own text formats), so it has no tool round
trip. It retries a 402 for about a minute whatever the body says (its retry loop treats LiteLLM's
APIError as transient; the limit is the constant RETRY_TIMEOUT = 60 s): the 402 test ends it as
soon as the first attempt's message is on screen ("Retrying in ...").
"""

from __future__ import annotations

import json

import pytest

from tests.compat.harness import (
    AIDER_VENV,
    FORMATS,
    MODEL_OF_FORMAT,
    ClientRun,
    Compat,
    client_binary,
    run_client,
)

pytestmark = pytest.mark.timeout(180)
CLIENT = "aider"
TIMEOUT = 90.0
PROVIDER_OF_FORMAT = {"openai": "openai", "anthropic": "anthropic"}


async def run_aider(
    c: Compat, fmt: str, prompt: str, *, key: str | None = None, stream: bool, until: str | None = None
) -> ClientRun:
    key = key or c.key
    model = f"{PROVIDER_OF_FORMAT[fmt]}/{MODEL_OF_FORMAT[fmt]}"
    home = c.home()
    metadata = home / "model-metadata.json"
    metadata.write_text(
        json.dumps(
            {
                model: {
                    "max_input_tokens": 128000,
                    "max_output_tokens": 4096,
                    "input_cost_per_token": 0.0,
                    "output_cost_per_token": 0.0,
                    "litellm_provider": PROVIDER_OF_FORMAT[fmt],
                    "mode": "chat",
                }
            }
        )
    )
    argv = [
        client_binary(AIDER_VENV / "bin" / "aider"),
        "--message", prompt,
        "--model", model,
        "--model-metadata-file", str(metadata),
        "--no-git", "--yes-always", "--no-check-update", "--no-show-model-warnings", "--no-analytics",
        "--no-show-release-notes", "--no-pretty", "--no-fancy-input", "--no-detect-urls",
        "--map-tokens", "0", "--no-auto-lint",
        "--chat-history-file", str(home / "chat.md"),
        "--input-history-file", str(home / "input.txt"),
        "--stream" if stream else "--no-stream",
    ]  # fmt: skip
    extra = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if fmt == "openai":
        argv += ["--openai-api-base", f"{c.gw.url}/v1", "--openai-api-key", key]
    else:
        argv += ["--anthropic-api-key", key]
        extra["ANTHROPIC_API_BASE"] = c.gw.url
    return await run_client(argv, env=c.env(home, **extra), cwd=c.project, timeout=TIMEOUT, until=until)


def chat_requests(c: Compat) -> list:
    return [r for r in c.recorder.requests if r.path in ("/v1/chat/completions", "/v1/messages")]


@pytest.mark.compat(CLIENT, "text")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_text(compat: Compat, fmt: str) -> None:
    run = await run_aider(compat, fmt, "Say hello.", stream=False)
    assert run.returncode == 0 and compat.marker in run.stdout, run.describe()
    sent = chat_requests(compat)
    assert [r.status for r in sent] == [200] and sent[0].body.get("stream") in (None, False)


@pytest.mark.compat(CLIENT, "stream")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_stream(compat: Compat, fmt: str) -> None:
    run = await run_aider(compat, fmt, "Say hello.", stream=True)
    assert run.returncode == 0 and compat.marker in run.stdout, run.describe()
    sent = chat_requests(compat)
    assert [r.status for r in sent] == [200] and sent[0].body.get("stream") is True


@pytest.mark.compat(CLIENT, "402 message")
@pytest.mark.parametrize("fmt", FORMATS)
async def test_402_message(compat: Compat, fmt: str) -> None:
    run = await run_aider(
        compat, fmt, "Say hello.", key=await compat.thin_key(), stream=True, until="Retrying in"
    )
    assert "credit" in run.flat and "/topup" in run.flat, run.describe()
    assert chat_requests(compat) and {r.status for r in chat_requests(compat)} == {402}
    assert not compat.upstream.requests
