"""Offline token counting: cl100k_base from the shipped BPE file, and prompt estimates per API format.

The encoding is loaded once, explicitly, by ``load_encoding()`` at start-up. Counting before that
raises instead of loading lazily, so a slow (or networked) load can never land on a request path.
The counts are estimates for models that are not OpenAI's: they pre-size holds (reservations) and
stand in for usage only when an upstream reports none.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import orjson
import simdjson
import tiktoken

__all__ = [
    "ASYNC_THRESHOLD_CHARS",
    "BPE_PATH",
    "CL100K_SHA256",
    "DOCUMENT_TOKENS_ESTIMATE",
    "IMAGE_TOKENS_ANTHROPIC",
    "IMAGE_TOKENS_OPENAI",
    "DuplicateKeys",
    "TokenizerDataError",
    "Uncountable",
    "collect_request",
    "count_anthropic_request",
    "count_anthropic_request_async",
    "count_openai_request",
    "count_openai_request_async",
    "count_parts",
    "count_text",
    "count_text_async",
    "fixed_estimates",
    "fixed_of_message",
    "fixed_outside_messages",
    "is_loaded",
    "load_encoding",
    "require_loaded",
]

BPE_PATH = Path(__file__).parent / "data" / "cl100k_base.tiktoken"
# tiktoken's published sha256 of cl100k_base.tiktoken (tiktoken_ext/openai_public.py).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
_CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

# Above this many characters a count runs in a worker thread: tiktoken's Rust core releases the
# GIL, so a 200k-token prompt (~100 ms to encode) does not stall every other stream on the loop.
ASYNC_THRESHOLD_CHARS = 16 * 1024
# Fixed per-item estimates; we never decode images or documents to measure them.
IMAGE_TOKENS_OPENAI = 765  # a 1024x1024 high-detail image in OpenAI's tile arithmetic
IMAGE_TOKENS_ANTHROPIC = 1_600  # ~1.15 megapixels at Anthropic's (w*h)/750
DOCUMENT_TOKENS_ESTIMATE = 3_000  # a base64/url document of unknown page count
# OpenAI cookbook overheads: ~3 tokens of framing per message, 3 to prime the reply.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


class TokenizerDataError(Exception):
    """The shipped BPE file is missing, unreadable or does not match its published hash."""


class _Holder:
    # One immutable Encoding, set once at start-up; a holder keeps it out of a rebindable global.
    __slots__ = ("encoding",)

    def __init__(self) -> None:
        self.encoding: tiktoken.Encoding | None = None


_holder = _Holder()


def _read_ranks(path: Path, expected_hash: str) -> dict[bytes, int]:
    # Same format and check as tiktoken.load.load_tiktoken_bpe, minus its read_file_cached step:
    # that one copies the file into TIKTOKEN_CACHE_DIR (or /tmp/data-gym-cache), and would prefer a
    # cached copy keyed by the path. Start-up stays read-only and verifies exactly these bytes.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerDataError(f"cannot read BPE file {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != expected_hash:
        raise TokenizerDataError(f"BPE file {path} does not match its expected sha256")
    ranks: dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except ValueError:
        raise TokenizerDataError(f"BPE file {path} is malformed") from None
    return ranks


def load_encoding(path: Path | None = None, *, expected_hash: str = CL100K_SHA256) -> tiktoken.Encoding:
    """Load cl100k_base from disk (never the network); call once at start-up.

    Without ``path`` a second call returns the encoding already loaded. An explicit ``path`` always
    reads and verifies that file, and installs it only if it passes.
    """
    if path is None:
        if _holder.encoding is not None:
            return _holder.encoding
        path = BPE_PATH
    ranks = _read_ranks(path, expected_hash)
    encoding = tiktoken.Encoding(
        name="cl100k_base",
        pat_str=_CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=_CL100K_SPECIAL,
    )
    _holder.encoding = encoding
    return encoding


def is_loaded() -> bool:
    return _holder.encoding is not None


def require_loaded() -> None:
    """Raise the clear "not loaded" error now (before handing a count to a worker thread)."""
    _encoding()


def _encoding() -> tiktoken.Encoding:
    encoding = _holder.encoding
    if encoding is None:
        # Loading here would put ~0.3 s of file parsing on a request; start-up must do it.
        raise RuntimeError("tokenizer not loaded: call gateway.tokens.load_encoding() at start-up")
    return encoding


def count_text(text: str) -> int:
    """Tokens in ``text``; special-token strings count as ordinary text, never an error."""
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))


async def count_text_async(text: str) -> int:
    """``count_text``, in a worker thread when the text is large."""
    if len(text) <= ASYNC_THRESHOLD_CHARS:
        return count_text(text)
    encoding = _encoding()  # fail on the loop, with the clear message, not in the worker
    loop = asyncio.get_running_loop()
    return len(await loop.run_in_executor(None, encoding.encode_ordinary, text))


# ---- request estimates -------------------------------------------------------------------------
# Each collector walks a client body (untrusted JSON: any field may have any type), appends the
# text worth counting to ``parts`` and returns the fixed overhead (framing, images). Malformed parts
# are skipped rather than rejected: validation belongs to the proxy, an estimate must not fail.
# ``cuts`` gets the end index (into ``parts``) of each unit an agent resends unchanged turn after
# turn: the system prompt, each message, the tools. gateway.estimate caches counts per unit.


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        if "ecursion" in str(exc):
            # Nested past orjson's limit (a body forwarded unwalked): not "no text", uncountable.
            raise Uncountable from None
        return ""  # not JSON a client could send (an integer past 64 bits): nothing to count


# The fixed-estimate walks also read a simdjson document (gateway.clientbody) before it is released.
_LISTS = (list, simdjson.Array)
_DICTS = (dict, simdjson.Object)


class DuplicateKeys(ValueError):
    """An object the walk reads has a key twice: simdjson reads the first, orjson (and many
    upstreams) the last, so the body must be read whole (gateway.clientbody)."""


class Uncountable(ValueError):
    """A JSON value counted as text could not be encoded (nested past orjson's limit)."""


def _read_as_one(obj: Any) -> Any:
    # A dict has one value per key by construction; a simdjson object may not.
    if type(obj) is simdjson.Object and len(obj) != len(set(obj.keys())):
        raise DuplicateKeys
    return obj


def _openai_content(content: Any, parts: list[str]) -> int:
    if isinstance(content, str):
        parts.append(content)
        return 0
    overhead = 0
    if isinstance(content, _LISTS):
        for part in content:
            if not isinstance(part, _DICTS):
                continue
            kind = _read_as_one(part).get("type")
            if kind == "text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif kind in ("image_url", "input_image"):
                overhead += IMAGE_TOKENS_OPENAI
            elif kind in ("file", "input_file"):
                overhead += DOCUMENT_TOKENS_ESTIMATE
            elif kind == "input_audio":
                overhead += DOCUMENT_TOKENS_ESTIMATE
            elif kind == "refusal":
                refusal = part.get("refusal")
                if isinstance(refusal, str):
                    parts.append(refusal)
    return overhead


def _collect_openai(body: dict[str, Any], parts: list[str], cuts: list[int]) -> int:
    overhead = _REPLY_PRIMING
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        if cuts[-1] != len(parts):
            cuts.append(len(parts))
        overhead += _PER_MESSAGE
        role = message.get("role")
        if isinstance(role, str):
            parts.append(role)
        if isinstance(message.get("name"), str):
            parts.append(message["name"])
            overhead += _PER_NAME
        overhead += _openai_content(message.get("content"), parts)
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str):
            parts.append(reasoning)
        tool_calls = message.get("tool_calls")
        for call in tool_calls if isinstance(tool_calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    if isinstance(function.get(key), str):
                        parts.append(function[key])
                overhead += _PER_MESSAGE
    cuts.append(len(parts))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        parts.append(_json_text(tools))
        cuts.append(len(parts))
    for key in ("response_format", "functions"):
        if isinstance(body.get(key), dict | list):
            parts.append(_json_text(body[key]))
    cuts.append(len(parts))
    return overhead


# Blocks nest (tool_result and document content): a body the proxy forwards unwalked may nest them
# arbitrarily deep, and a count must not hit the recursion limit; deeper blocks are not counted.
_MAX_BLOCK_NESTING = 16


def _anthropic_blocks(content: Any, parts: list[str], depth: int = 0) -> int:
    if depth > _MAX_BLOCK_NESTING:
        return 0
    if isinstance(content, str):
        parts.append(content)
        return 0
    overhead = 0
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            if isinstance(block.get("text"), str):
                parts.append(block["text"])
        elif kind == "image":
            overhead += IMAGE_TOKENS_ANTHROPIC
        elif kind == "document":
            source = block.get("source")
            if (
                isinstance(source, dict)
                and source.get("type") == "text"
                and isinstance(source.get("data"), str)
            ):
                parts.append(source["data"])
            elif isinstance(source, dict) and source.get("type") == "content":
                overhead += _anthropic_blocks(source.get("content"), parts, depth + 1)
            else:
                overhead += DOCUMENT_TOKENS_ESTIMATE
        elif kind == "tool_use" or kind == "server_tool_use":
            if isinstance(block.get("name"), str):
                parts.append(block["name"])
            parts.append(_json_text(block.get("input")))
        elif kind == "tool_result":
            overhead += _anthropic_blocks(block.get("content"), parts, depth + 1)
        elif kind == "thinking":
            if isinstance(block.get("thinking"), str):
                parts.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue  # opaque ciphertext: its size says nothing reliable about tokens
        else:
            parts.append(_json_text(block))  # server-tool results and future block types
    return overhead


def _collect_anthropic(body: dict[str, Any], parts: list[str], cuts: list[int]) -> int:
    overhead = _REPLY_PRIMING
    overhead += _anthropic_blocks(body.get("system"), parts)
    cuts.append(len(parts))
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        overhead += _PER_MESSAGE
        overhead += _anthropic_blocks(message.get("content"), parts)
        cuts.append(len(parts))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        parts.append(_json_text(tools))
        cuts.append(len(parts))
    return overhead


def _anthropic_fixed(content: Any, depth: int = 0) -> int:
    # _anthropic_blocks' overhead without collecting text: images, documents counted at their fixed
    # estimates, nested content followed (text parts add nothing here).
    if depth > _MAX_BLOCK_NESTING or not isinstance(content, _LISTS):
        return 0
    total = 0
    for block in content:
        if not isinstance(block, _DICTS):
            continue
        kind = _read_as_one(block).get("type")
        if kind == "image":
            total += IMAGE_TOKENS_ANTHROPIC
        elif kind == "document":
            source = _read_as_one(block.get("source"))
            if isinstance(source, _DICTS) and source.get("type") == "text" and isinstance(source.get("data"), str):
                continue
            if isinstance(source, _DICTS) and source.get("type") == "content":
                total += _anthropic_fixed(source.get("content"), depth + 1)
            else:
                total += DOCUMENT_TOKENS_ESTIMATE
        elif kind == "tool_result":
            total += _anthropic_fixed(block.get("content"), depth + 1)
    return total


def fixed_of_message(message: Any, fmt: str) -> int:
    """One message's images and documents at their fixed estimates (the rules of ``collect_request``);
    ``message`` is a dict or a simdjson object. Walks only content lists, never text."""
    content = _read_as_one(message).get("content") if isinstance(message, _DICTS) else None
    if fmt == "anthropic":
        return _anthropic_fixed(content)
    return _openai_content(content, []) if isinstance(content, _LISTS) else 0


def fixed_outside_messages(body: Any, fmt: str) -> int:
    """The same for the rest of a request (Anthropic's system blocks)."""
    return _anthropic_fixed(body.get("system")) if fmt == "anthropic" else 0


def fixed_estimates(body: Any, fmt: str) -> int:
    """The part of a request's estimate that is not text: its images and documents at their fixed
    estimates. ``body`` is a dict or a simdjson object."""
    total = fixed_outside_messages(body, fmt)
    messages = body.get("messages")
    for message in messages if isinstance(messages, _LISTS) else ():
        total += fixed_of_message(message, fmt)
    return total


def count_parts(parts: list[str]) -> int:
    # Each part is encoded on its own, as OpenAI's cookbook counts messages; joining them would
    # add a separator token per part and merge tokens across boundaries.
    encode = _encoding().encode_ordinary
    return sum(len(encode(part)) for part in parts if part)


async def _count_parts_async(parts: list[str]) -> int:
    if sum(map(len, parts)) <= ASYNC_THRESHOLD_CHARS:
        return count_parts(parts)
    _encoding()  # fail on the loop, with the clear message, not in the worker
    return await asyncio.get_running_loop().run_in_executor(None, count_parts, parts)


def collect_request(body: dict[str, Any], fmt: str) -> tuple[int, list[str], list[int]]:
    """What an estimate counts: (fixed overhead, text parts, unit ends into the parts).

    The estimate is ``overhead + sum(count_text(p) for p in parts)``; ``cuts`` are increasing end
    indexes, the last one ``len(parts)``; a unit is ``parts[previous cut:cut]``.
    """
    parts: list[str] = []
    cuts = [0]
    collect = _collect_anthropic if fmt == "anthropic" else _collect_openai
    overhead = collect(body, parts, cuts)
    if cuts[-1] != len(parts):
        cuts.append(len(parts))
    return overhead, parts, cuts


def count_openai_request(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of an OpenAI Chat Completions body."""
    overhead, parts, _ = collect_request(body, "openai")
    return overhead + count_parts(parts)


def count_anthropic_request(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of an Anthropic Messages (or count_tokens) body."""
    overhead, parts, _ = collect_request(body, "anthropic")
    return overhead + count_parts(parts)


async def count_openai_request_async(body: dict[str, Any]) -> int:
    """``count_openai_request``, in a worker thread when the text is large."""
    overhead, parts, _ = collect_request(body, "openai")
    return overhead + await _count_parts_async(parts)


async def count_anthropic_request_async(body: dict[str, Any]) -> int:
    """``count_anthropic_request``, in a worker thread when the text is large."""
    overhead, parts, _ = collect_request(body, "anthropic")
    return overhead + await _count_parts_async(parts)
