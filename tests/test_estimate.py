"""The hold's prompt bound (never below the exact count) and the salted, bounded count cache."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway import tokens
from gateway.clientbody import parse_body
from gateway.estimate import CACHE_MIN_UNIT_BYTES, TokenCountCache, estimate_body, estimate_prompt, utf8_len

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPO = Path(__file__).resolve().parent.parent
SOURCE = "".join(p.read_text() for p in sorted((REPO / "gateway").glob("*.py")))  # real code, >100 KB


@pytest.fixture(autouse=True, scope="module")
def _loaded() -> None:
    tokens.load_encoding()


# ---- bodies as clients send them, and as they should not ----------------------------------------

# Text that tokenizes badly as well as well: code, digits, whitespace runs, CJK, emoji, special-token
# strings, and any unicode hypothesis likes.
texts = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from(list("0123456789 \n\t.,;:{}()[]<|>'\"\\")), max_size=300),
    st.text(alphabet=st.characters(min_codepoint=0x3000, max_codepoint=0x9FFF), max_size=100),
    st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=60),
    st.sampled_from(["<|endoftext|>", "<|fim_prefix|>", " " * 50, "\n" * 20, "'s'll've're"]),
    st.integers(0, len(SOURCE) - 1).map(lambda i: SOURCE[i : i + 2000]),
)
junk = st.one_of(st.none(), st.integers(), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=3))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)

openai_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": texts})}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_image", "file", "input_file", "input_audio"])}),
    st.fixed_dictionaries({"type": st.just("refusal"), "refusal": texts}),
    junk,
)
openai_calls = st.fixed_dictionaries(
    {
        "id": texts,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": texts, "arguments": st.one_of(texts, junk)}),
    }
)
openai_messages = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": st.one_of(texts, st.lists(openai_parts, max_size=4), junk)},
        optional={"name": st.one_of(texts, junk), "reasoning_content": texts, "tool_calls": st.lists(st.one_of(openai_calls, junk), max_size=3)},
    ),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": texts, "content": texts}),
    junk,
)
tools = st.lists(st.dictionaries(st.sampled_from(["type", "function", "name", "parameters"]), json_values, max_size=4), max_size=4)
openai_bodies = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.one_of(st.lists(openai_messages, max_size=6), junk)},
    optional={"tools": st.one_of(tools, junk), "response_format": json_values, "functions": json_values},
)

anthropic_blocks = st.deferred(
    lambda: st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, junk)}, optional={"cache_control": st.just({"type": "ephemeral"})}),
        st.fixed_dictionaries({"type": st.just("image"), "source": json_values}),
        st.fixed_dictionaries(
            {"type": st.just("document"), "source": st.one_of(
                st.fixed_dictionaries({"type": st.just("text"), "data": texts}),
                st.fixed_dictionaries({"type": st.just("content"), "content": st.one_of(texts, st.lists(anthropic_blocks, max_size=2))}),
                st.fixed_dictionaries({"type": st.just("base64"), "data": texts}),
            )}
        ),
        st.fixed_dictionaries({"type": st.sampled_from(["tool_use", "server_tool_use"]), "id": texts, "name": st.one_of(texts, junk), "input": json_values}),
        st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": texts, "content": st.one_of(texts, st.lists(anthropic_blocks, max_size=3))}),
        st.fixed_dictionaries({"type": st.just("thinking"), "thinking": texts, "signature": texts}),
        st.fixed_dictionaries({"type": st.just("redacted_thinking"), "data": texts}),
        st.fixed_dictionaries({"type": st.sampled_from(["web_search_tool_result", "future_block"]), "content": json_values}),
        junk,
    )
)
anthropic_content = st.one_of(texts, st.lists(anthropic_blocks, max_size=4), junk)
anthropic_bodies = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "max_tokens": st.just(100),
        "messages": st.one_of(
            st.lists(st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": anthropic_content}), junk), max_size=6),
            junk,
        ),
    },
    optional={"system": anthropic_content, "tools": st.one_of(tools, junk)},
)


# ---- the bound ------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(texts, st.text(alphabet=st.characters(codec="utf-8"), max_size=200)))
def test_a_text_has_no_more_cl100k_tokens_than_utf8_bytes(text: str) -> None:
    assert tokens.count_text(text) <= utf8_len(text) == len(text.encode("utf-8", "surrogatepass"))


def test_a_lone_surrogate_is_bounded_too() -> None:
    # tiktoken replaces it with U+FFFD (3 bytes); surrogatepass encodes it in 3 bytes as well.
    for text in ("\ud800", "a\udfffb", "\ud83d" * 5):
        assert tokens.count_text(text) <= utf8_len(text)


@SETTINGS
@given(openai_bodies)
async def test_openai_bound_is_never_below_the_exact_count(body: dict[str, Any]) -> None:
    prompt = estimate_prompt(body, "openai", TokenCountCache())
    exact = tokens.count_openai_request(body)
    assert prompt.bound >= exact
    assert await prompt.exact() == exact
    assert prompt.is_exact


@SETTINGS
@given(anthropic_bodies)
async def test_anthropic_bound_is_never_below_the_exact_count(body: dict[str, Any]) -> None:
    prompt = estimate_prompt(body, "anthropic", TokenCountCache())
    exact = tokens.count_anthropic_request(body)
    assert prompt.bound >= exact
    assert await prompt.exact() == exact


# What the proxy computes: the length of the client's JSON text plus images and documents at their
# fixed estimates (gateway.estimate.raw_bound), never walking the text. Clients write JSON compact,
# spaced, pretty or ASCII-escaped; each must give a bound at or above the exact count of the parse.
_writers = st.sampled_from(
    [
        orjson.dumps,
        lambda o: json.dumps(o).encode(),
        lambda o: json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode(),
        lambda o: json.dumps(o, indent=1).encode(),
    ]
)


def _written(body: dict[str, Any], write: Any) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = write(body)
        parsed = orjson.loads(raw)  # what the proxy works on (a client's NaN or lone surrogate: no JSON)
    except (TypeError, ValueError, orjson.JSONDecodeError):
        assume(False)
    return raw, parsed


@SETTINGS
@given(openai_bodies, _writers)
async def test_openai_bound_from_the_json_text_is_never_below_the_exact_count(body: dict[str, Any], write: Any) -> None:
    raw, parsed = _written(body, write)
    prompt = estimate_prompt(parsed, "openai", TokenCountCache(), raw_bytes=len(raw))
    exact = tokens.count_openai_request(parsed)
    assert prompt.bound >= exact
    assert await prompt.exact() == exact


@SETTINGS
@given(anthropic_bodies, _writers)
async def test_anthropic_bound_from_the_json_text_is_never_below_the_exact_count(
    body: dict[str, Any], write: Any
) -> None:
    raw, parsed = _written(body, write)
    prompt = estimate_prompt(parsed, "anthropic", TokenCountCache(), raw_bytes=len(raw))
    exact = tokens.count_anthropic_request(parsed)
    assert prompt.bound >= exact
    assert await prompt.exact() == exact


@SETTINGS
@given(st.one_of(openai_bodies.map(lambda b: (b, "openai")), anthropic_bodies.map(lambda b: (b, "anthropic"))), _writers)
async def test_a_summarised_body_bounds_and_counts_as_the_whole_one(case: Any, write: Any) -> None:
    # The proxy's read of a same-format request (gateway.clientbody): the bound from the text's
    # length and the images and documents read from simdjson's tape, the exact count from the
    # whole object parsed on demand; the same numbers as for the dict.
    body, fmt = case
    raw, parsed = _written(body, write)
    big = frozenset(("messages", "system", "tools"))
    read = parse_body(raw, lambda model: (big, fmt))
    prompt = estimate_body(read, fmt, TokenCountCache())
    exact = tokens.count_anthropic_request(parsed) if fmt == "anthropic" else tokens.count_openai_request(parsed)
    if read.summarised:
        assert prompt.bound == estimate_prompt(parsed, fmt, raw_bytes=len(raw)).bound
    assert prompt.bound >= exact
    assert await prompt.exact() == exact


def test_the_bound_from_the_json_text_does_not_walk_the_text_until_asked() -> None:
    body = _agent_body(3, marked=2)
    raw = orjson.dumps(body)
    prompt = estimate_prompt(body, "anthropic", TokenCountCache(), raw_bytes=len(raw))
    assert prompt.bound == len(raw)  # no images or documents in it
    assert prompt._parts == [] and not prompt.is_exact  # nothing collected yet
    assert prompt.exact_now() == tokens.count_anthropic_request(body) < prompt.bound


def test_images_and_documents_add_their_fixed_estimates_to_the_text_bound() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    doc = {"type": "document", "source": {"type": "base64", "data": "AAAA"}}
    nested = {"type": "tool_result", "tool_use_id": "t", "content": [image]}
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [image, doc, nested]}]}
    raw = orjson.dumps(body)
    bound = estimate_prompt(body, "anthropic", raw_bytes=len(raw)).bound
    assert bound == len(raw) + 2 * tokens.IMAGE_TOKENS_ANTHROPIC + tokens.DOCUMENT_TOKENS_ESTIMATE
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
    raw = orjson.dumps(chat)
    assert estimate_prompt(chat, "openai", raw_bytes=len(raw)).bound == len(raw) + tokens.IMAGE_TOKENS_OPENAI


def test_blocks_nested_past_the_limit_are_not_followed() -> None:
    # A same-format body is forwarded unchecked for depth: counting it must not recurse without end.
    content: Any = "deep"
    for _ in range(900):
        content = [{"type": "tool_result", "tool_use_id": "t", "content": content}]
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
    assert tokens.count_anthropic_request(body) >= 0
    assert tokens.fixed_estimates(body, "anthropic") == 0


def test_the_bound_on_source_code_is_a_few_times_the_count_not_more() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": SOURCE}]}
    prompt = estimate_prompt(body, "openai")
    exact = tokens.count_openai_request(body)
    assert exact < prompt.bound < 6 * exact


def _agent_body(turns: int, marked: int) -> dict[str, Any]:
    # Claude Code's shape: system blocks, tools, tool_use/tool_result turns, the cache breakpoint
    # on the newest block (it moves every turn).
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "Find the bug."}]}]
    for i in range(turns):
        messages.append({"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}", "name": "Read", "input": {"file_path": f"/f{i}.py"}}]})
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": f"t{i}", "content": SOURCE[i * 3000 : i * 3000 + 3000]}
        if i == marked:
            block["cache_control"] = {"type": "ephemeral"}
        messages.append({"role": "user", "content": [block]})
    return {
        "model": "m",
        "max_tokens": 100,
        "system": [{"type": "text", "text": SOURCE[-4000:], "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": f"T{i}", "description": SOURCE[i * 500 : i * 500 + 500], "input_schema": {"type": "object"}} for i in range(20)],
        "messages": messages,
    }


async def test_the_next_turn_counts_only_what_it_did_not_send_before() -> None:
    cache = TokenCountCache()
    first = estimate_prompt(_agent_body(10, marked=9), "anthropic", cache)
    assert await first.exact() == tokens.count_anthropic_request(_agent_body(10, marked=9))
    misses = cache.misses
    following = _agent_body(11, marked=10)  # one more turn; the breakpoint moved off turn 9
    second = estimate_prompt(following, "anthropic", cache)
    assert await second.exact() == tokens.count_anthropic_request(following)
    # Counted afresh: the new tool turn only (its short tool_use message is counted uncached).
    assert cache.misses - misses == 1
    assert cache.hits >= 10


async def test_exact_is_computed_once_even_when_awaited_concurrently() -> None:
    import asyncio

    cache = TokenCountCache()
    prompt = estimate_prompt(_agent_body(12, marked=11), "anthropic", cache)
    counts = await asyncio.gather(*(prompt.exact() for _ in range(5)))
    assert len(set(counts)) == 1
    assert cache.hits == 0  # five awaits, one count: nothing was looked up twice


# ---- the cache ------------------------------------------------------------------------------------


def test_cache_keeps_at_most_max_entries_least_recently_used_out() -> None:
    cache = TokenCountCache(max_entries=3)
    keys = [cache.key([f"unit {i} " * 40]) for i in range(5)]
    for i, k in enumerate(keys[:3]):
        cache.put(k, i)
    assert cache.get(keys[0]) == 0  # used: now the most recent
    cache.put(keys[3], 3)
    cache.put(keys[4], 4)
    assert len(cache) == 3
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is None
    assert [cache.get(k) for k in (keys[0], keys[3], keys[4])] == [0, 3, 4]
    with pytest.raises(ValueError):
        TokenCountCache(max_entries=0)


def test_cache_keys_are_salted_per_cache_and_not_a_plain_hash() -> None:
    parts = ["def handler(request):\n    return 42\n" * 10]
    a, b = TokenCountCache(), TokenCountCache()
    assert a.key(parts) == a.key(parts)
    assert a.key(parts) != b.key(parts)
    data = parts[0].encode()
    plain = {
        hashlib.sha256(data).digest()[:16],
        hashlib.sha256(len(data).to_bytes(8, "little") + data).digest()[:16],
        hashlib.blake2b(data, digest_size=16).digest(),
    }
    assert a.key(parts) not in plain
    # Unit boundaries matter: the same text split differently is another unit.
    assert a.key(["ab", "c"]) != a.key(["a", "bc"])


async def test_cache_holds_no_text_of_the_request_only_digests_and_counts() -> None:
    cache = TokenCountCache()
    marker = "SECRET-canary-7f3a "
    body = _agent_body(6, marked=5)
    body["messages"].append({"role": "user", "content": [{"type": "text", "text": marker * 100}]})
    body["system"].append({"type": "text", "text": marker})  # short: counted, never hashed
    await estimate_prompt(body, "anthropic", cache).exact()
    assert len(cache) > 0
    seen: set[int] = set()
    stack: list[Any] = [cache]
    found: list[Any] = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes | bytearray):
            found.append(obj)
            continue
        stack.extend(gc.get_referents(obj))
    texts_found = [o for o in found if isinstance(o, str)]
    # Only the object's own attribute names; every bytes is a 16-byte digest.
    assert all(not isinstance(o, bytes) or len(o) == 16 for o in found)
    assert all("canary" not in o and len(o) < 40 for o in texts_found)
    assert not any(b"canary" in o for o in found if isinstance(o, bytes))
    assert all(isinstance(v, int) for v in cache._counts.values())


async def test_small_units_are_counted_without_touching_the_cache() -> None:
    cache = TokenCountCache()
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * (CACHE_MIN_UNIT_BYTES - 10)}]}
    assert await estimate_prompt(body, "openai", cache).exact() == tokens.count_openai_request(body)
    assert len(cache) == 0 and cache.hits == cache.misses == 0


def test_cache_memory_is_bounded_by_its_entry_limit() -> None:
    cache = TokenCountCache(max_entries=1000)
    for i in range(5000):
        cache.put(cache.key([f"message number {i} " * 20]), i)
    assert len(cache) == 1000
    per_entry = cache.memory_bytes() / len(cache)
    assert per_entry < 250  # a 16-byte digest, an int and the mapping's slot


def test_bodies_round_trip_through_json_unchanged_estimate() -> None:
    # What the proxy sees is orjson's parse of the client's bytes: same parts, same bound.
    body = _agent_body(3, marked=2)
    again = orjson.loads(orjson.dumps(body))
    assert estimate_prompt(body, "anthropic").bound == estimate_prompt(again, "anthropic").bound


def test_json_nested_past_what_can_be_encoded_counts_at_its_bound() -> None:
    # A same-format body is forwarded without a depth check; counting it must not drop the deep part
    # (orjson refuses to encode past ~255 levels): its bound stands for its count.
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "t", "description": "d" * 300_000, "input_schema": {"x": deep}}]}
    prompt = estimate_prompt(body, "anthropic", TokenCountCache(), raw_bytes=300_000 + 1_000)
    assert prompt.exact_now() == prompt.bound
