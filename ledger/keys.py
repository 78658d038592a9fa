"""Redis key layout and identifiers: every account lives in one of a fixed number of hash-tagged shards.

A shard is a Redis hash slot (``{prefix}:{s07}:...``): an account's buckets, reservations, keys and its
shard's journal stream share it, so every Lua call touches one slot and the layout runs unchanged on a
Redis Cluster. Identifiers carry their shard (``acc_07…``, ``key_07…``, ``cpk_07_…``) so any of them
finds its slot without a look-up. The shard count is fixed when the ledger is created.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

__all__ = [
    "API_KEY_PREFIX",
    "Keyspace",
    "account_id_for_reference",
    "hash_api_key",
    "hash_subject",
    "key_id_for_reference",
    "new_account_id",
    "new_api_key",
    "new_bucket_id",
    "new_key_id",
    "new_request_id",
    "shard_for_subject",
    "shard_of",
]

API_KEY_PREFIX = "cpk_"
_ID_RE = re.compile(r"^(acc|key|bkt|req|cpk|rfd|top)_([0-9a-f]{2})[A-Za-z0-9_\-]{4,80}$")


def shard_of(ident: str) -> int:
    """The shard encoded in an account, key, bucket, request or API-key id; ValueError if malformed."""
    m = _ID_RE.match(ident)
    if not m:
        raise ValueError("malformed id")
    return int(m.group(2), 16)


def _ms() -> int:
    return int(time.time() * 1000)


def new_account_id(shard: int) -> str:
    return f"acc_{shard:02x}{secrets.token_hex(8)}"


def new_key_id(shard: int) -> str:
    return f"key_{shard:02x}{secrets.token_hex(6)}"


def _ref_digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(("ops-ref", *parts)).encode()).hexdigest()


def account_id_for_reference(reference: str, shards: int) -> str:
    """The account an operator's idempotency reference names: the same reference, the same id (so a
    retried `account create --ref` finds the first one, also after a rebuild)."""
    digest = _ref_digest("account", reference)
    return f"acc_{int(digest[:8], 16) % shards:02x}{digest[8:24]}"


def key_id_for_reference(account_id: str, reference: str) -> str:
    """The key id an operator's idempotency reference names inside one account."""
    return f"key_{shard_of(account_id):02x}{_ref_digest('key', account_id, reference)[:12]}"


def new_bucket_id(shard: int, now_ms: int | None = None) -> str:
    # Time first so that, inside one account, ids sort oldest first: the expiry tie-break.
    return f"bkt_{shard:02x}{now_ms if now_ms is not None else _ms():013d}{secrets.token_hex(4)}"


def new_request_id(shard: int, now_ms: int | None = None) -> str:
    return f"req_{shard:02x}{now_ms if now_ms is not None else _ms():013d}{secrets.token_hex(5)}"


def new_api_key(shard: int) -> str:
    # SECURITY: 32 random bytes = 256 bits of entropy; shown once, stored only as its SHA-256.
    return f"{API_KEY_PREFIX}{shard:02x}_{secrets.token_urlsafe(32)}"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shard_for_subject(subject: str, shards: int) -> int:
    """Accounts signed in with Google live in the shard of their sub, so the sub index shares the slot."""
    return int.from_bytes(hashlib.sha256(subject.encode()).digest()[:4], "big") % shards


def hash_subject(subject: str) -> str:
    return hashlib.sha256(b"sub:" + subject.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Keyspace:
    prefix: str = "cp"
    shards: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 256:
            raise ValueError("LEDGER_SHARDS must be between 1 and 256")

    def shard_prefix(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard:02x}}}:"

    def journal(self, shard: int) -> str:
        return self.shard_prefix(shard) + "j"

    def epoch(self, shard: int) -> str:
        """The shard's marker that its data is whole (see ledger/epoch.py)."""
        return self.shard_prefix(shard) + "epoch"

    def pfx_for(self, ident: str) -> str:
        return self.shard_prefix(shard_of(ident))

    def all_shards(self) -> range:
        return range(self.shards)

    def pattern(self) -> str:
        """SCAN pattern matching every key of this ledger (tests, rebuild checks)."""
        return f"{self.prefix}:{{s*}}:*"
