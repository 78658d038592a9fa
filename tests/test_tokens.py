"""Token counting: the shipped cl100k file, offline loading, request estimates, off-loop counting."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import tokens
from gateway.tokens import (
    BPE_PATH,
    IMAGE_TOKENS_ANTHROPIC,
    IMAGE_TOKENS_OPENAI,
    TokenizerDataError,
    count_anthropic_request,
    count_anthropic_request_async,
    count_openai_request,
    count_openai_request_async,
    count_text,
    count_text_async,
    load_encoding,
)

REPO = Path(__file__).resolve().parent.parent

# OpenAI cookbook "How to count tokens with tiktoken": 129 prompt tokens for gpt-4 / gpt-3.5-turbo-0613,
# a figure the cookbook checks against the API's own usage.prompt_tokens.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.fixture(autouse=True)
def _loaded() -> None:
    load_encoding()


def test_known_cl100k_tokens() -> None:
    encoding = load_encoding()
    assert encoding.encode_ordinary("hello world") == [15339, 1917]
    assert encoding.encode_ordinary("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert encoding.encode_ordinary("antidisestablishmentarianism") == [519, 85342, 34500, 479, 8997, 2191]
    assert encoding.n_vocab == 100277
    assert count_text("hello world") == 2
    assert count_text("") == 0


def test_special_token_text_counts_as_ordinary_text() -> None:
    assert count_text("<|endoftext|>") == 7
    assert count_text("a <|fim_prefix|> b <|endofprompt|>") > 4


def test_load_without_path_returns_the_loaded_encoding() -> None:
    assert load_encoding() is load_encoding()
    assert tokens.is_loaded()


def test_corrupted_file_is_rejected_and_the_good_encoding_stays(tmp_path: Path) -> None:
    data = bytearray(BPE_PATH.read_bytes())
    data[1000] ^= 0x01
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(bytes(data))
    before = load_encoding()
    with pytest.raises(TokenizerDataError, match="sha256"):
        load_encoding(bad)
    assert load_encoding() is before
    assert count_text("hello world") == 2


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TokenizerDataError, match="cannot read"):
        load_encoding(tmp_path / "absent.tiktoken")


def test_shipped_file_passes_an_explicit_load() -> None:
    assert load_encoding(BPE_PATH).encode_ordinary("hello world") == [15339, 1917]


def test_fresh_process_refuses_to_count_before_load_and_loads_offline(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    program = textwrap.dedent(
        """
        import socket, sys

        def no_network(*args, **kwargs):
            raise AssertionError("network used")

        socket.socket.connect = no_network
        socket.socket.connect_ex = no_network
        socket.getaddrinfo = no_network
        socket.create_connection = no_network

        from gateway import tokens
        try:
            tokens.count_text("hello world")
        except RuntimeError as exc:
            assert "load_encoding" in str(exc)
        else:
            raise AssertionError("counted before load")
        assert not tokens.is_loaded()
        tokens.load_encoding()
        assert tokens.count_text("hello world") == 2
        assert "requests" not in sys.modules  # tiktoken's downloader was never reached
        print("ok")
        """
    )
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "DATA_GYM_CACHE_DIR": str(cache),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert list(cache.iterdir()) == []  # nothing fetched, nothing cached


def test_openai_request_matches_the_cookbook_count() -> None:
    assert count_openai_request({"model": "gpt-4", "messages": COOKBOOK_MESSAGES}) == 129


def test_openai_request_counts_parts_tools_and_images() -> None:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello world"}]}
    plain = count_openai_request(base)
    assert plain == 3 + 3 + count_text("user") + 2
    parts = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello world"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
    }
    assert count_openai_request(parts) == plain + IMAGE_TOKENS_OPENAI
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    assert count_openai_request({**base, "tools": tools}) == plain + count_text(orjson.dumps(tools).decode())
    call = {
        "role": "assistant",
        "content": None,
        "reasoning_content": "think",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "a.py"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "c1", "content": "print(1)"}
    both = count_openai_request({"model": "m", "messages": [*base["messages"], call, result]})
    expected_extra = (
        3
        + count_text("assistant")
        + count_text("think")
        + 3
        + count_text("read_file")
        + count_text('{"path": "a.py"}')
        + 3
        + count_text("tool")
        + count_text("print(1)")
    )
    assert both == plain + expected_extra


def test_anthropic_request_counts_system_blocks_tools_and_images() -> None:
    base: dict[str, Any] = {
        "model": "c",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hello world"}],
    }
    plain = count_anthropic_request(base)
    assert plain == 3 + 3 + 2
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    assert count_anthropic_request({**base, "system": system}) == plain + count_text("You are terse.")
    assert count_anthropic_request({**base, "system": "You are terse."}) == plain + count_text(
        "You are terse."
    )
    tools = [{"name": "bash", "description": "run", "input_schema": {"type": "object"}}]
    assert count_anthropic_request({**base, "tools": tools}) == plain + count_text(
        orjson.dumps(tools).decode()
    )
    turn = [
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "plan", "signature": "sig"},
                {"type": "tool_use", "id": "t1", "name": "bash", "input": {"command": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [
                        {"type": "text", "text": "a.py"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA"},
                        },
                    ],
                },
            ],
        },
    ]
    counted = count_anthropic_request({**base, "messages": [*base["messages"], *turn]})
    extra = (
        3
        + count_text("plan")
        + count_text("bash")
        + count_text('{"command":"ls"}')
        + 3
        + count_text("a.py")
        + IMAGE_TOKENS_ANTHROPIC
    )
    assert counted == plain + extra


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": "nope"},
        {"messages": [None, 3, {"role": 5, "content": 7}, {"content": [None, {"type": "text", "text": 9}]}]},
        {
            "messages": [{"role": "user", "content": [{"type": "tool_result", "content": {"bad": 1}}]}],
            "system": 12,
        },
        {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "x"}]}], "tools": "x"},
    ],
)
def test_malformed_bodies_are_estimated_not_rejected(body: dict[str, object]) -> None:
    assert count_openai_request(body) >= 3
    assert count_anthropic_request(body) >= 3


async def test_async_variants_agree_with_sync() -> None:
    small = {"messages": COOKBOOK_MESSAGES}
    assert await count_openai_request_async(small) == 129
    big_text = "def f(x):\n    return x * 2  # comment\n" * 2_000
    big = {
        "model": "c",
        "max_tokens": 1,
        "system": big_text,
        "messages": [{"role": "user", "content": big_text}],
    }
    assert len(big_text) > tokens.ASYNC_THRESHOLD_CHARS
    assert await count_anthropic_request_async(big) == count_anthropic_request(big)
    assert await count_openai_request_async({"messages": big["messages"]}) == count_openai_request(
        {"messages": big["messages"]}
    )
    assert await count_text_async(big_text) == count_text(big_text)
    assert await count_text_async("hello world") == 2


async def test_large_count_does_not_block_the_event_loop() -> None:
    # ~600k tokens of varied text: long enough to encode that an inline count would starve the ticker.
    words = [f"token{i} value_{i * 7 % 1000} {'alpha' if i % 3 else 'beta'}," for i in range(100_000)]
    text = " ".join(words)
    started = time.perf_counter()
    expected = count_text(text)
    inline_s = time.perf_counter() - started
    assert inline_s > 0.05, "sample too small to tell blocking from not"

    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            await asyncio.sleep(0.002)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    assert await count_text_async(text) == expected
    stop = True
    await task
    # Inline, the ticker could not run at all while encoding; in the worker it keeps ticking.
    assert ticks >= max(3, int(inline_s / 0.002) // 4)
