"""Personal data in the journal: sealed with the account's own key, which closing the account deletes.

The journal streams are append-only and trimmed only after the worker copied them into SQLite, and
Redis may keep a trimmed entry's bytes in a stream node for a while: so an account's email and Google
``sub`` never enter a stream as text. Each account has a random 256-bit key in its Redis record
(``pii_key``); the scripts journal the email and sub sealed with it (AES-256-GCM, a fresh nonce per
value, bound to the account and field), and the worker opens them with the key it reads from the
account's record, in the same shard. Closing deletes the key with the email, so whatever is left of
the account's events in Redis is unreadable from then on.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["new_account_key", "open_sealed", "seal"]

_NONCE = 12


def new_account_key() -> str:
    return secrets.token_bytes(32).hex()


def seal(key_hex: str, account_id: str, field: str, value: str) -> str:
    """The value as the journal may carry it; '' stays '' (nothing to hide)."""
    if not value:
        return ""
    nonce = secrets.token_bytes(_NONCE)
    sealed = AESGCM(bytes.fromhex(key_hex)).encrypt(nonce, value.encode(), f"{account_id}\0{field}".encode())
    return base64.b64encode(nonce + sealed).decode()


def open_sealed(key_hex: str | None, account_id: str, field: str, sealed: str) -> str | None:
    """The value, or None when it cannot be read any more (the account was closed: its key is gone)."""
    if not sealed:
        return ""
    if not key_hex:
        return None
    try:
        raw = base64.b64decode(sealed, validate=True)
        plain = AESGCM(bytes.fromhex(key_hex)).decrypt(
            raw[:_NONCE], raw[_NONCE:], f"{account_id}\0{field}".encode()
        )
    except (InvalidTag, ValueError, binascii.Error):
        return None
    return plain.decode()
