"""A local OpenID Connect issuer on loopback that signs real RS256 ID tokens, with switchable faults."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import html
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

__all__ = ["FakeIssuer", "FakeUser", "Fault"]


class Fault(enum.Enum):
    WRONG_AUDIENCE = "wrong_audience"
    BAD_SIGNATURE = "bad_signature"  # signed by a key that is not in the JWKS, under a published kid
    UNKNOWN_KID = "unknown_kid"  # signed by an unpublished key under a kid the JWKS never lists
    EXPIRED = "expired"
    WRONG_NONCE = "wrong_nonce"
    WRONG_ISSUER = "wrong_issuer"  # the ID token's iss
    DISCOVERY_ISSUER = "discovery_issuer"  # the discovery document names another issuer
    TOKEN_ERROR = "token_error"  # the token endpoint answers 400 invalid_grant
    DENY = "deny"  # /authorize redirects back with error=access_denied


@dataclass
class FakeUser:
    sub: str = "1000000001"
    email: str = "user@example.com"
    email_verified: bool = True


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    user: FakeUser


@dataclass
class FakeIssuer:
    """Serve with ``async with FakeIssuer() as issuer:``; ``issuer.url`` is the issuer identifier.

    ``auto_approve`` (default) makes /authorize redirect straight back; when False it shows a
    "Sign in as ..." page whose button does the same (for browser tests).
    """

    client_id: str = "test-client"
    client_secret: str = "test-secret"
    user: FakeUser = field(default_factory=FakeUser)
    faults: set[Fault] = field(default_factory=set)
    auto_approve: bool = True
    auth_methods: list[str] = field(default_factory=lambda: ["client_secret_basic", "client_secret_post"])
    url: str = ""
    # What the token endpoint saw, for assertions: (auth method or None, error or None).
    token_requests: list[tuple[str | None, str | None]] = field(default_factory=list)
    jwks_fetches: int = 0

    def __post_init__(self) -> None:
        self._key = RSAKey.generate_key(2048, {"kid": "key-1", "use": "sig", "alg": "RS256"})
        self._codes: dict[str, _Grant] = {}
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeIssuer:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/authorize", self._approve)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def rotate_key(self) -> None:
        """Sign with a fresh key under a new kid, as an issuer does when it rotates."""
        kid = f"key-{secrets.token_hex(4)}"
        self._key = RSAKey.generate_key(2048, {"kid": kid, "use": "sig", "alg": "RS256"})

    def id_token(self, claims: dict[str, Any], key: RSAKey | None = None) -> str:
        """Sign arbitrary claims with the issuer's current key (or ``key``)."""
        signer = key or self._key
        return jwt.encode({"alg": "RS256", "kid": signer.kid}, claims, signer)

    async def _discovery(self, request: web.Request) -> web.Response:
        issuer = self.url + "/other" if Fault.DISCOVERY_ISSUER in self.faults else self.url
        return web.json_response(
            {
                "issuer": issuer,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "jwks_uri": self.url + "/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "email"],
                "token_endpoint_auth_methods_supported": self.auth_methods,
                "code_challenge_methods_supported": ["S256"],
                "claims_supported": ["sub", "email", "email_verified", "iss", "aud", "exp", "iat", "nonce"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response(KeySet([self._key]).as_dict(private=False))

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != self.client_id or q.get("response_type") != "code":
            return web.Response(status=400, text="unknown client or response_type")
        if "openid" not in q.get("scope", "").split() or q.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="scope must hold openid; PKCE S256 required")
        if not q.get("redirect_uri") or not q.get("code_challenge"):
            return web.Response(status=400, text="redirect_uri and code_challenge required")
        if self.auto_approve:
            return self._redirect_back(dict(q))
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in q.items()
        )
        page = (
            "<!doctype html><title>Fake issuer</title><form method=post action=/authorize>"
            f"{hidden}<button type=submit name=decision value=approve>"
            f"Sign in as {html.escape(self.user.email)}</button>"
            "<button type=submit name=decision value=deny>Cancel</button></form>"
        )
        return web.Response(text=page, content_type="text/html")

    async def _approve(self, request: web.Request) -> web.Response:
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        deny = params.pop("decision", "") == "deny"
        return self._redirect_back(params, deny=deny)

    def _redirect_back(self, params: dict[str, str], deny: bool = False) -> web.Response:
        back: dict[str, str] = {}
        if deny or Fault.DENY in self.faults:
            back["error"] = "access_denied"
        else:
            code = secrets.token_urlsafe(24)
            self._codes[code] = _Grant(
                client_id=params["client_id"],
                redirect_uri=params["redirect_uri"],
                code_challenge=params["code_challenge"],
                nonce=params.get("nonce"),
                user=FakeUser(self.user.sub, self.user.email, self.user.email_verified),
            )
            back["code"] = code
        if "state" in params:
            back["state"] = params["state"]
        raise web.HTTPFound(params["redirect_uri"] + "?" + urlencode(back))

    def _client_auth(self, request: web.Request, form: dict[str, str]) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                pair = base64.b64decode(header[6:], validate=True).decode()
            except ValueError:
                return None
            client_id, _, secret = pair.partition(":")
            client_id, secret, method = unquote(client_id), unquote(secret), "client_secret_basic"
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
            method = "client_secret_post"
        if method not in self.auth_methods:
            return None
        ok = client_id == self.client_id and hmac.compare_digest(secret, self.client_secret)
        return method if ok else None

    def _token_error(self, method: str | None, error: str, status: int = 400) -> web.Response:
        self.token_requests.append((method, error))
        return web.json_response({"error": error}, status=status)

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        method = self._client_auth(request, form)
        if method is None:
            return self._token_error(None, "invalid_client", 401)
        if Fault.TOKEN_ERROR in self.faults:
            return self._token_error(method, "invalid_grant")
        if form.get("grant_type") != "authorization_code":
            return self._token_error(method, "unsupported_grant_type")
        grant = self._codes.pop(form.get("code", ""), None)  # one-time codes
        if grant is None or grant.client_id != self.client_id:
            return self._token_error(method, "invalid_grant")
        if form.get("redirect_uri") != grant.redirect_uri:
            return self._token_error(method, "invalid_grant")
        digest = hashlib.sha256(form.get("code_verifier", "").encode("ascii", "replace")).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if not hmac.compare_digest(challenge, grant.code_challenge):
            return self._token_error(method, "invalid_grant")
        self.token_requests.append((method, None))
        return web.json_response(
            {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": "openid email",
                "id_token": self._signed_id_token(grant),
            }
        )

    def _signed_id_token(self, grant: _Grant) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": grant.client_id,
            "azp": grant.client_id,
            "sub": grant.user.sub,
            "email": grant.user.email,
            "email_verified": grant.user.email_verified,
            "iat": now,
            "exp": now + 3600,
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        if Fault.WRONG_AUDIENCE in self.faults:
            claims["aud"] = claims["azp"] = "another-client"
        if Fault.EXPIRED in self.faults:
            claims["iat"], claims["exp"] = now - 7200, now - 3600
        if Fault.WRONG_NONCE in self.faults:
            claims["nonce"] = secrets.token_urlsafe(16)
        if Fault.WRONG_ISSUER in self.faults:
            claims["iss"] = "https://issuer.invalid"
        key = self._key
        if Fault.BAD_SIGNATURE in self.faults:
            key = RSAKey.generate_key(2048, {"kid": self._key.kid or "", "use": "sig", "alg": "RS256"})
        if Fault.UNKNOWN_KID in self.faults:
            key = RSAKey.generate_key(2048, {"kid": "unpublished", "use": "sig", "alg": "RS256"})
        return self.id_token(claims, key)
