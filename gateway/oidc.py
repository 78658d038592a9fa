"""OpenID Connect sign-in (Google): discovery, authorization-code flow with PKCE, ID token checks.

authlib supplies the protocol pieces (token generation, the S256 challenge, the ID token claims
rules) and joserfc the signature check; the HTTP goes through the app's own aiohttp session.

How a caller uses it (the web routes):

    url, pending = await client.begin()
    session["oidc_pending"] = pending.as_dict()           # then redirect the browser to url
    ...
    # callback: pop FIRST, so the pending sign-in is gone whatever happens next
    data = session.pop("oidc_pending", None)
    if data is None: ...                                  # no sign-in in progress: refuse
    identity = await client.complete(PendingSignIn.from_dict(data), request.query)
    # then aiohttp_session.new_session() and store identity.sub / identity.email

Popping is not enough on its own when sessions live in cookies (a browser can replay an old
cookie), so ``complete`` also records each state it consumed in a ``StateStore`` for as long as a
pending sign-in stays valid; a second ``complete`` with the same state fails with
``replayed_state``. The default store is in-process; with several web processes pass a shared one
(e.g. Redis ``SET key 1 NX EX ttl``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet

from gateway.errors import GatewayError

__all__ = [
    "GOOGLE_ISSUER",
    "PENDING_MAX_AGE_S",
    "Identity",
    "InMemoryStateStore",
    "OIDCClient",
    "PendingSignIn",
    "SignInError",
    "StateStore",
    "accepted_issuers",
    "verify_id_token",
]

GOOGLE_ISSUER = "https://accounts.google.com"
# Google's own documentation: ID tokens carry either form of its issuer.
_GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})

PENDING_MAX_AGE_S = 600
ID_TOKEN_LEEWAY_S = 60
HTTP_TIMEOUT_S = 10.0
DISCOVERY_TTL_S = 24 * 3600
# Google rotates its signing keys every few days and publishes the next one ahead of use.
JWKS_TTL_S = 3600
_MAX_RESPONSE_BYTES = 256 * 1024
_MAX_ID_TOKEN_CHARS = 16 * 1024

# SECURITY: asymmetric algorithms only. Never "none", never HS* (that would make the client
# secret a signing key anyone holding it could use).
_ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")

_REASONS: dict[str, tuple[int, str]] = {
    "state_mismatch": (400, "Sign-in could not be matched to this browser; please start again."),
    "state_expired": (400, "Sign-in took too long; please start again."),
    "replayed_state": (400, "This sign-in link was already used; please start again."),
    "provider_error": (401, "The sign-in provider did not approve the sign-in."),
    "provider_unavailable": (502, "The sign-in provider could not be reached; please try again."),
    "issuer_mismatch": (401, "Sign-in failed: the identity token came from an unexpected issuer."),
    "token_exchange_failed": (401, "Sign-in failed: the provider refused the sign-in code."),
    "bad_signature": (401, "Sign-in failed: the identity token signature is invalid."),
    # No published key has the token's kid: OIDCClient refetches the JWKS once, then says bad_signature.
    "unknown_key": (401, "Sign-in failed: the identity token signature is invalid."),
    "wrong_audience": (401, "Sign-in failed: the identity token was issued for another application."),
    "expired": (401, "Sign-in failed: the identity token has expired."),
    "nonce_mismatch": (401, "Sign-in failed: the identity token does not belong to this sign-in."),
    "invalid_token": (401, "Sign-in failed: the identity token is malformed."),
    "email_unverified": (403, "Sign-in needs an account with a verified email address."),
}


class SignInError(GatewayError):
    """A refused sign-in. ``reason`` is a stable code; the message never carries token contents."""

    anthropic_type = "authentication_error"
    openai_type = "invalid_request_error"

    def __init__(self, reason: str) -> None:
        status, message = _REASONS[reason]
        super().__init__(message)
        self.reason = reason
        self.code = reason
        self.status = status


@dataclass(frozen=True)
class Identity:
    """What we keep from the provider: the stable subject id and the verified email."""

    sub: str
    email: str


@dataclass(frozen=True)
class PendingSignIn:
    """The secrets of one sign-in in progress, kept in the caller's session until the callback."""

    state: str
    nonce: str
    code_verifier: str
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "nonce": self.nonce,
            "code_verifier": self.code_verifier,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingSignIn:
        """Rebuild from a session; anything malformed counts as no matching sign-in."""
        try:
            state, nonce, verifier = data["state"], data["nonce"], data["code_verifier"]
            created_at = data["created_at"]
        except (KeyError, TypeError):
            raise SignInError("state_mismatch") from None
        if not all(isinstance(v, str) and v for v in (state, nonce, verifier)):
            raise SignInError("state_mismatch")
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise SignInError("state_mismatch")
        return cls(state=state, nonce=nonce, code_verifier=verifier, created_at=float(created_at))


class StateStore(Protocol):
    async def consume(self, state: str, ttl_s: int) -> bool:
        """Record ``state`` as used for ``ttl_s`` seconds; False if it was already recorded."""
        ...


class InMemoryStateStore:
    """Consumed states of this process, each forgotten once its pending sign-in would be stale."""

    def __init__(self, clock: Callable[[], float] = time.time, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._until: dict[str, float] = {}
        self._next_prune = 0.0

    async def consume(self, state: str, ttl_s: int) -> bool:
        now = self._clock()
        if len(self._until) >= self._max_entries or now >= self._next_prune:
            self._until = {s: t for s, t in self._until.items() if t > now}
            self._next_prune = now + 60
        if self._until.get(state, 0.0) > now:
            return False
        if len(self._until) >= self._max_entries:
            # Full of live entries: refusing is safer than forgetting one that might be replayed.
            return False
        self._until[state] = now + ttl_s
        return True


def accepted_issuers(configured_issuer: str) -> frozenset[str]:
    """The exact ``iss`` values an ID token may carry for the configured issuer."""
    if configured_issuer in _GOOGLE_ISSUERS:
        return _GOOGLE_ISSUERS
    return frozenset({configured_issuer})


_CLAIM_REASONS = {
    "iss": "issuer_mismatch",
    "aud": "wrong_audience",
    "azp": "wrong_audience",
    "exp": "expired",
    "nonce": "nonce_mismatch",
}


def verify_id_token(
    id_token: str,
    keys: KeySet,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    now: float,
    access_token: str | None = None,
) -> Identity:
    """Check an ID token's signature and claims (OIDC Core 3.1.3.7) and return who it names."""
    if len(id_token) > _MAX_ID_TOKEN_CHARS:
        raise SignInError("invalid_token")
    try:
        token = jwt.decode(id_token, keys, algorithms=_ID_TOKEN_ALGORITHMS)
    except InvalidKeyIdError:
        raise SignInError("unknown_key") from None
    except BadSignatureError:
        raise SignInError("bad_signature") from None
    except (JoseError, ValueError):
        raise SignInError("invalid_token") from None

    params: dict[str, Any] = {"nonce": nonce, "client_id": client_id}
    if access_token:
        params["access_token"] = access_token
    claims = CodeIDToken(
        token.claims,
        token.header,
        options={
            "iss": {"essential": True, "values": sorted(accepted_issuers(issuer))},
            "aud": {"essential": True, "value": client_id},
            "sub": {"essential": True},
        },
        params=params,
    )
    try:
        claims.validate(now=int(now), leeway=ID_TOKEN_LEEWAY_S)
    except ExpiredTokenError:
        raise SignInError("expired") from None
    except MissingClaimError as error:
        # A missing nonce or azp (needed with several audiences) is a mismatch; anything else malformed.
        reason = {"nonce": "nonce_mismatch", "azp": "wrong_audience"}.get(error.claim, "invalid_token")
        raise SignInError(reason) from None
    except ClaimError as error:
        raise SignInError(_CLAIM_REASONS.get(error.claim, "invalid_token")) from None
    except (JoseError, ValueError, TypeError, KeyError):
        raise SignInError("invalid_token") from None

    # authlib only checks the nonce when one was sent; ours always is, so insist on it here too.
    claimed_nonce = claims.get("nonce")
    if not isinstance(claimed_nonce, str) or not hmac.compare_digest(claimed_nonce.encode(), nonce.encode()):
        raise SignInError("nonce_mismatch")

    sub, email = claims.get("sub"), claims.get("email")
    if not isinstance(sub, str) or not sub:
        raise SignInError("invalid_token")
    # Some providers send the flag as the string "true"; anything else is unverified.
    if claims.get("email_verified") not in (True, "true"):
        raise SignInError("email_unverified")
    if not isinstance(email, str) or "@" not in email:
        raise SignInError("email_unverified")
    return Identity(sub=sub, email=email)


class OIDCClient:
    """One relying party at one issuer; share a single instance per app (it caches discovery)."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        state_store: StateStore | None = None,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self._client_secret = client_secret
        self.redirect_uri = redirect_uri
        self._session = session
        self._clock = clock
        self._states: StateStore = state_store or InMemoryStateStore(clock)
        self._timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        self._metadata: dict[str, Any] | None = None
        self._metadata_until = 0.0
        self._keys: KeySet | None = None
        self._keys_until = 0.0
        self._lock = asyncio.Lock()

    async def discover(self) -> dict[str, Any]:
        """The issuer's discovery document, fetched once per ``DISCOVERY_TTL_S``."""
        async with self._lock:
            if self._metadata is not None and self._clock() < self._metadata_until:
                return self._metadata
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await self._get_json(url, "provider_unavailable")
            # SECURITY: OIDC Discovery 4.3, the document must name exactly the issuer we asked.
            if doc.get("issuer") != self.issuer:
                raise SignInError("issuer_mismatch")
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not self._is_endpoint(doc.get(field)):
                    raise SignInError("provider_unavailable")
            self._metadata = doc
            self._metadata_until = self._clock() + DISCOVERY_TTL_S
            return doc

    async def begin(self) -> tuple[str, PendingSignIn]:
        """The URL to send the browser to, and the secrets the caller keeps until the callback."""
        metadata = await self.discover()
        pending = PendingSignIn(
            state=generate_token(43),
            nonce=generate_token(43),
            # RFC 7636 4.1: 43 to 128 unreserved characters; generate_token's alphabet is within that.
            code_verifier=generate_token(64),
            created_at=self._clock(),
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": "openid email",
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": create_s256_code_challenge(pending.code_verifier),
                "code_challenge_method": "S256",
            }
        )
        endpoint: str = metadata["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query, pending

    async def complete(self, pending: PendingSignIn, query: Mapping[str, str]) -> Identity:
        """Finish the sign-in from the callback's query string; each ``pending`` works once."""
        returned_state = query.get("state")
        # SECURITY: constant-time compare; the state is what ties the callback to this browser.
        if not isinstance(returned_state, str) or not hmac.compare_digest(
            returned_state.encode(), pending.state.encode()
        ):
            raise SignInError("state_mismatch")
        age_s = self._clock() - pending.created_at
        if age_s > PENDING_MAX_AGE_S or age_s < -ID_TOKEN_LEEWAY_S:
            raise SignInError("state_expired")
        # Consumed before anything else can fail, so even a failed attempt cannot be retried.
        if not await self._states.consume(pending.state, PENDING_MAX_AGE_S + ID_TOKEN_LEEWAY_S):
            raise SignInError("replayed_state")
        if "error" in query:
            raise SignInError("provider_error")
        code = query.get("code")
        if not isinstance(code, str) or not code:
            raise SignInError("provider_error")

        metadata = await self.discover()
        tokens = await self._exchange_code(metadata, code, pending.code_verifier)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise SignInError("token_exchange_failed")
        access_token = tokens.get("access_token")
        access_token = access_token if isinstance(access_token, str) else None

        keys = await self._signing_keys(metadata, refresh=False)
        try:
            return self._verify(id_token, keys, pending.nonce, access_token)
        except SignInError as error:
            if error.reason != "unknown_key":
                raise
        # An unknown kid usually means the issuer rotated its keys since we cached them: refetch once.
        keys = await self._signing_keys(metadata, refresh=True)
        try:
            return self._verify(id_token, keys, pending.nonce, access_token)
        except SignInError as error:
            if error.reason == "unknown_key":
                raise SignInError("bad_signature") from None
            raise

    def _verify(self, id_token: str, keys: KeySet, nonce: str, access_token: str | None) -> Identity:
        return verify_id_token(
            id_token,
            keys,
            issuer=self.issuer,
            client_id=self.client_id,
            nonce=nonce,
            now=self._clock(),
            access_token=access_token,
        )

    async def _exchange_code(self, metadata: Mapping[str, Any], code: str, verifier: str) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        headers = {"Accept": "application/json"}
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_basic" in methods:
            # RFC 6749 2.3.1: id and secret are form-encoded before being joined and base64-encoded.
            pair = f"{quote(self.client_id, safe='')}:{quote(self._client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        elif "client_secret_post" in methods:
            form["client_id"] = self.client_id
            form["client_secret"] = self._client_secret
        else:
            raise SignInError("token_exchange_failed")
        try:
            async with self._session.post(
                metadata["token_endpoint"], data=form, headers=headers, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    raise SignInError("token_exchange_failed")
                return await self._read_json(response, "token_exchange_failed")
        except (aiohttp.ClientError, TimeoutError):
            raise SignInError("provider_unavailable") from None

    async def _signing_keys(self, metadata: Mapping[str, Any], *, refresh: bool) -> KeySet:
        async with self._lock:
            if not refresh and self._keys is not None and self._clock() < self._keys_until:
                return self._keys
            doc = await self._get_json(metadata["jwks_uri"], "provider_unavailable")
            try:
                keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError):
                raise SignInError("provider_unavailable") from None
            self._keys = keys
            self._keys_until = self._clock() + JWKS_TTL_S
            return keys

    async def _get_json(self, url: str, reason: str) -> dict[str, Any]:
        try:
            async with self._session.get(
                url, headers={"Accept": "application/json"}, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    raise SignInError(reason)
                return await self._read_json(response, reason)
        except (aiohttp.ClientError, TimeoutError):
            raise SignInError(reason) from None

    @staticmethod
    async def _read_json(response: aiohttp.ClientResponse, reason: str) -> dict[str, Any]:
        body = await response.content.read(_MAX_RESPONSE_BYTES + 1)
        if len(body) > _MAX_RESPONSE_BYTES:
            raise SignInError(reason)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SignInError(reason) from None
        if not isinstance(doc, dict):
            raise SignInError(reason)
        return doc

    def _is_endpoint(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        parts = urlsplit(value)
        # SECURITY: an https issuer may only send us to https endpoints.
        scheme_ok = parts.scheme == "https" or (
            parts.scheme == "http" and urlsplit(self.issuer).scheme == "http"
        )
        return scheme_ok and bool(parts.netloc)
