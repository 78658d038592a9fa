"""A request's prompt size for its hold: a cheap upper bound first, the exact count only when needed.

Counting a coding agent's 100k-token prompt with tiktoken costs ~40 ms of CPU on every request
(issue 13); forwarding it costs ~1 ms. So the hot path does not count: ``PromptEstimate.bound`` is

    overhead + sum(UTF-8 bytes of each counted part)

over exactly the parts and overhead that ``gateway.tokens`` counts, and it is never below the exact
count: cl100k encodes each regex piece of a text into tokens that are non-empty byte strings whose
concatenation is the piece's UTF-8 bytes, so a text of n bytes has at most n tokens (a lone
surrogate, which tiktoken replaces with U+FFFD, is 3 bytes either way). Source code runs ~4 bytes a
token, so the bound is ~4x the count; it only sizes a hold that is released at settle.

``PromptEstimate.exact()`` is ``gateway.tokens``' count, the same number as before. It runs only
where the number matters beyond sizing a hold that fits anyway: when the bound does not fit the
balance (the proxy then retries the hold with the exact count, so no request is refused or cut
short because of the bound), for the no-usage fallback bill, for a translated stream's announced
input, and for count_tokens. It runs in a worker thread when large, and a ``TokenCountCache`` keyed
by a salted hash of each unit (system prompt, message, tools) makes an agent's next turn count only
what it has not sent before.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import tokens
from .clientbody import ClientBody

__all__ = [
    "CACHE_MIN_UNIT_BYTES",
    "PromptEstimate",
    "TokenCountCache",
    "estimate_body",
    "estimate_prompt",
    "raw_bound",
    "utf8_len",
]

# Units smaller than this are counted directly (a few microseconds): no hash of a short text is ever
# kept, and the cache holds only units worth the memory.
CACHE_MIN_UNIT_BYTES = 256
DEFAULT_MAX_ENTRIES = 65_536


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8, a lone surrogate counted as the 3 bytes tiktoken encodes for it."""
    if text.isascii():  # O(1) in CPython: a flag on the string
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


class TokenCountCache:
    """Unit hash -> exact token count; least recently used out past ``max_entries``.

    Holds 16-byte digests and ints only, never text. The digest is SHA-256 over a random 64-byte
    per-process salt (one whole block, so its state is a secret starting point) then the unit's
    length-prefixed parts: without the salt a digest cannot be checked against a guessed text.
    Thread-safe: counting runs in worker threads.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._salted = hashlib.sha256(secrets.token_bytes(64))
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, parts: list[str]) -> bytes:
        h = self._salted.copy()
        for part in parts:
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.digest()[:16]

    def get(self, key: bytes) -> int | None:
        with self._lock:
            count = self._counts.get(key)
            if count is None:
                self.misses += 1
                return None
            self._counts.move_to_end(key)
            self.hits += 1
            return count

    def put(self, key: bytes, count: int) -> None:
        with self._lock:
            self._counts[key] = count
            self._counts.move_to_end(key)
            while len(self._counts) > self.max_entries:
                self._counts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._counts)

    def memory_bytes(self) -> int:
        """The mapping, its keys and its values (ints below 257 are shared, counted anyway)."""
        with self._lock:
            return sys.getsizeof(self._counts) + sum(
                sys.getsizeof(k) + sys.getsizeof(v) for k, v in self._counts.items()
            )

    def count_unit(self, parts: list[str]) -> int:
        """Exact tokens of one unit, from the cache when it was counted before."""
        if sum(map(utf8_len, parts)) < CACHE_MIN_UNIT_BYTES:
            return tokens.count_parts(parts)
        key = self.key(parts)
        count = self.get(key)
        if count is None:
            count = tokens.count_parts(parts)
            self.put(key, count)
        return count


_default_cache = TokenCountCache()


class PromptEstimate:
    """One request's prompt: ``bound`` now, ``await exact()`` when the exact count is needed.

    Keeps a reference to the request body (or to its text parts) until the exact count is made (or
    the request ends), never copies; the cache it fills keeps none.
    """

    __slots__ = ("_body", "_cache", "_cuts", "_exact", "_fmt", "_overhead", "_parts", "bound")

    def __init__(
        self,
        bound: int,
        cache: TokenCountCache,
        *,
        collected: tuple[int, list[str], list[int]] | None = None,
        body: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
        fmt: str = "openai",
    ) -> None:
        # Either the parts already collected (``collected``) or the body to collect them from when
        # the exact count is asked for (or a function parsing it then: a summarised client body).
        self.bound = bound  # also how large the text is, near enough to choose the loop or a thread
        self._cache = cache
        self._body = body
        self._fmt = fmt
        self._overhead, self._parts, self._cuts = collected if collected is not None else (0, [], [])
        self._exact: asyncio.Future[int] | int | None = None

    @property
    def is_exact(self) -> bool:
        return isinstance(self._exact, int)

    def exact_now(self) -> int:
        """The exact count, on this thread (``exact()`` moves large ones off the event loop)."""
        if isinstance(self._exact, int):
            return self._exact
        if self._body is not None:
            body = self._body() if callable(self._body) else self._body
            try:
                self._overhead, self._parts, self._cuts = tokens.collect_request(body, self._fmt)
            except tokens.Uncountable:
                # A body forwarded unwalked holds JSON nested past what can be encoded to count:
                # its bound stands for its count (never less than the text it holds).
                self._body = None
                return self.bound
            self._body = None
        parts, cuts, cache = self._parts, self._cuts, self._cache
        total = self._overhead
        for start, end in itertools.pairwise(cuts):
            if end > start:
                total += cache.count_unit(parts[start:end])
        return total

    async def exact(self) -> int:
        """The exact count (gateway.tokens' number); computed once, in a worker thread when large."""
        if isinstance(self._exact, int):
            return self._exact
        if self._exact is None:
            if self.bound <= tokens.ASYNC_THRESHOLD_CHARS:
                self._settle_exact(self.exact_now())
                assert isinstance(self._exact, int)
                return self._exact
            tokens.require_loaded()  # fail on the loop, with the clear message, not in the worker
            self._exact = asyncio.get_running_loop().run_in_executor(None, self.exact_now)
        pending = self._exact
        count = await pending
        self._settle_exact(count)
        return count

    def _settle_exact(self, count: int) -> None:
        self._exact = count
        self._body = None
        self._parts = []  # the text is not needed any more
        self._cuts = []


def estimate_prompt(
    body: dict[str, Any], fmt: str, cache: TokenCountCache | None = None, *, raw_bytes: int | None = None
) -> PromptEstimate:
    """The prompt of a client body in ``fmt`` ("openai" or "anthropic"); cheap: no tokenizing.

    With ``raw_bytes`` (the length of the JSON text the body was parsed from) the bound is that length
    plus the fixed estimates of images and documents, and the body is not walked for its text until
    an exact count is asked for (see ``raw_bound``)."""
    cache = _default_cache if cache is None else cache
    if raw_bytes is not None:
        return PromptEstimate(raw_bound(body, fmt, raw_bytes), cache, body=body, fmt=fmt)
    overhead, parts, cuts = tokens.collect_request(body, fmt)
    return PromptEstimate(overhead + sum(map(utf8_len, parts)), cache, collected=(overhead, parts, cuts))


def estimate_body(body: ClientBody, fmt: str, cache: TokenCountCache | None = None) -> PromptEstimate:
    """``estimate_prompt`` of a client's request as the proxy read it: a summarised body's bound
    from its length and the fixed estimates read with it, its exact count parsing it whole then."""
    if body.summarised:
        bound = len(body.raw) + body.fixed_tokens
        return PromptEstimate(bound, _default_cache if cache is None else cache, body=body.whole, fmt=fmt)
    return estimate_prompt(body.head, fmt, cache, raw_bytes=len(body.raw))


def raw_bound(body: dict[str, Any], fmt: str, raw_bytes: int) -> int:
    """An upper bound of the exact count from the length of the body's JSON text: every text part the
    count encodes is a JSON string in that text, whose escaped form is at least as long as its UTF-8
    bytes (a lone surrogate is 6 bytes escaped, 3 counted); the JSON values counted as text (tools,
    tool inputs, unknown blocks) are re-encoded compactly, no longer than the client wrote them; the
    per-message framing tokens are fewer than each message's own punctuation and keys, which are not
    counted. Images and documents are added at their fixed estimates.
    One exception, stated rather than paid for on every request: a number the client wrote with an
    exponent inside a counted JSON value (``1e5``) is re-encoded longer (``100000.0``)."""
    return raw_bytes + tokens.fixed_estimates(body, fmt)
