"""Google sign-in pieces against a real local OIDC issuer over loopback HTTP."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import aiohttp
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from gateway.oidc import (
    GOOGLE_ISSUER,
    Identity,
    OIDCClient,
    PendingSignIn,
    SignInError,
    accepted_issuers,
    verify_id_token,
)
from tests.fakes.oidc import FakeIssuer, FakeUser, Fault

REDIRECT_URI = "http://127.0.0.1:8000/auth/google/callback"


@pytest.fixture
async def issuer() -> AsyncIterator[FakeIssuer]:
    async with FakeIssuer(user=FakeUser(sub="sub-42", email="ann@example.com")) as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_client(issuer: FakeIssuer, http: aiohttp.ClientSession, **kwargs: Any) -> OIDCClient:
    return OIDCClient(issuer.url, issuer.client_id, issuer.client_secret, REDIRECT_URI, http, **kwargs)


async def browse(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Follow the authorization URL like a browser would, up to the redirect back to us."""
    async with http.get(url, allow_redirects=False) as response:
        assert response.status == 302
        location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return dict(parse_qsl(urlsplit(location).query))


async def sign_in(client: OIDCClient, http: aiohttp.ClientSession) -> Identity:
    url, pending = await client.begin()
    return await client.complete(pending, await browse(http, url))


async def refused(client: OIDCClient, http: aiohttp.ClientSession) -> SignInError:
    with pytest.raises(SignInError) as info:
        await sign_in(client, http)
    return info.value


async def test_good_sign_in_returns_identity(issuer: FakeIssuer, http: aiohttp.ClientSession) -> None:
    client = make_client(issuer, http)
    url, pending = await client.begin()
    params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(issuer.url + "/authorize?")
    assert params["response_type"] == "code"
    assert params["scope"] == "openid email"
    assert params["client_id"] == issuer.client_id
    assert params["redirect_uri"] == REDIRECT_URI
    assert params["state"] == pending.state and params["nonce"] == pending.nonce
    assert params["code_challenge_method"] == "S256"
    assert params["code_challenge"] == create_s256_code_challenge(pending.code_verifier)
    assert "code_verifier" not in params

    identity = await client.complete(pending, await browse(http, url))

    assert identity == Identity(sub="sub-42", email="ann@example.com")
    assert issuer.token_requests == [("client_secret_basic", None)]


async def test_client_secret_post_used_when_issuer_offers_only_that(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    issuer.auth_methods = ["client_secret_post"]
    assert await sign_in(make_client(issuer, http), http) == Identity("sub-42", "ann@example.com")
    assert issuer.token_requests == [("client_secret_post", None)]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.WRONG_AUDIENCE, "wrong_audience"),
        (Fault.BAD_SIGNATURE, "bad_signature"),
        (Fault.EXPIRED, "expired"),
        (Fault.WRONG_NONCE, "nonce_mismatch"),
        (Fault.WRONG_ISSUER, "issuer_mismatch"),
        (Fault.TOKEN_ERROR, "token_exchange_failed"),
        (Fault.DENY, "provider_error"),
    ],
)
async def test_issuer_fault_is_refused_with_its_reason(
    issuer: FakeIssuer, http: aiohttp.ClientSession, fault: Fault, reason: str
) -> None:
    issuer.faults.add(fault)
    error = await refused(make_client(issuer, http), http)
    assert error.reason == reason
    # SECURITY: the message is for users and never carries what the token said.
    assert "ann@example.com" not in str(error) and "sub-42" not in str(error)


async def test_unverified_email_is_refused(issuer: FakeIssuer, http: aiohttp.ClientSession) -> None:
    issuer.user.email_verified = False
    error = await refused(make_client(issuer, http), http)
    assert error.reason == "email_unverified"
    assert error.status == 403


async def test_discovery_naming_another_issuer_is_refused(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    issuer.faults.add(Fault.DISCOVERY_ISSUER)
    with pytest.raises(SignInError) as info:
        await make_client(issuer, http).begin()
    assert info.value.reason == "issuer_mismatch"


async def test_completing_the_same_pending_twice_is_refused(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    url, pending = await client.begin()
    query = await browse(http, url)
    assert await client.complete(pending, query) == Identity("sub-42", "ann@example.com")

    with pytest.raises(SignInError) as info:
        await client.complete(pending, query)
    assert info.value.reason == "replayed_state"
    assert len(issuer.token_requests) == 1  # refused before the code went anywhere


async def test_second_callback_with_same_state_and_fresh_code_is_refused(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    url, pending = await client.begin()
    first, second = await browse(http, url), await browse(http, url)
    assert first["state"] == second["state"] and first["code"] != second["code"]

    assert (await client.complete(pending, first)).sub == "sub-42"
    with pytest.raises(SignInError) as info:
        await client.complete(pending, second)
    assert info.value.reason == "replayed_state"


async def test_failed_attempt_still_consumes_the_state(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    issuer.faults.add(Fault.TOKEN_ERROR)
    url, pending = await client.begin()
    query = await browse(http, url)
    with pytest.raises(SignInError):
        await client.complete(pending, query)
    issuer.faults.clear()
    with pytest.raises(SignInError) as info:
        await client.complete(pending, query)
    assert info.value.reason == "replayed_state"


async def test_pkce_verifier_mismatch_is_refused_at_token_endpoint(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    url, pending = await client.begin()
    query = await browse(http, url)
    forged = dataclasses.replace(pending, code_verifier="x" * 64)

    with pytest.raises(SignInError) as info:
        await client.complete(forged, query)

    assert info.value.reason == "token_exchange_failed"
    assert issuer.token_requests == [("client_secret_basic", "invalid_grant")]


async def test_callback_with_other_or_missing_state_is_refused(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    url, pending = await client.begin()
    query = await browse(http, url)
    for bad in ({**query, "state": pending.state[:-1] + "!"}, {"code": query["code"]}):
        with pytest.raises(SignInError) as info:
            await client.complete(pending, bad)
        assert info.value.reason == "state_mismatch"
    # A forged callback must not burn the real one.
    assert (await client.complete(pending, query)).email == "ann@example.com"


async def test_pending_older_than_ten_minutes_is_refused(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    now = [time.time()]
    client = make_client(issuer, http, clock=lambda: now[0])
    url, pending = await client.begin()
    query = await browse(http, url)
    now[0] += 601

    with pytest.raises(SignInError) as info:
        await client.complete(pending, query)
    assert info.value.reason == "state_expired"
    assert issuer.token_requests == []


async def test_unknown_kid_refetches_jwks_once(issuer: FakeIssuer, http: aiohttp.ClientSession) -> None:
    client = make_client(issuer, http)
    await sign_in(client, http)
    await sign_in(client, http)
    assert issuer.jwks_fetches == 1  # cached

    issuer.rotate_key()
    assert (await sign_in(client, http)).sub == "sub-42"
    assert issuer.jwks_fetches == 2


async def test_unknown_kid_after_refetch_is_bad_signature(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    issuer.faults.add(Fault.UNKNOWN_KID)
    assert (await refused(client, http)).reason == "bad_signature"
    assert issuer.jwks_fetches == 2  # the cached set, then exactly one refetch


async def test_unreachable_issuer_is_provider_unavailable(http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OIDCClient(f"http://127.0.0.1:{port}", "c", "s", REDIRECT_URI, http)
    with pytest.raises(SignInError) as info:
        await client.begin()
    assert info.value.reason == "provider_unavailable"


async def test_pending_sign_in_survives_a_json_session(
    issuer: FakeIssuer, http: aiohttp.ClientSession
) -> None:
    client = make_client(issuer, http)
    url, pending = await client.begin()
    stored = json.loads(json.dumps(pending.as_dict()))
    assert PendingSignIn.from_dict(stored) == pending
    assert (await client.complete(PendingSignIn.from_dict(stored), await browse(http, url))).sub == "sub-42"

    for broken in ({}, {**stored, "nonce": 5}, {**stored, "created_at": "now"}):
        with pytest.raises(SignInError) as info:
            PendingSignIn.from_dict(broken)
        assert info.value.reason == "state_mismatch"


async def test_interactive_page_approves_and_cancels(issuer: FakeIssuer, http: aiohttp.ClientSession) -> None:
    issuer.auto_approve = False
    client = make_client(issuer, http)
    url, pending = await client.begin()
    async with http.get(url) as response:
        page = await response.text()
    assert "Sign in as ann@example.com" in page
    form = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}

    async with http.post(issuer.url + "/authorize", data=form, allow_redirects=False) as response:
        query = dict(parse_qsl(urlsplit(response.headers["Location"]).query))
    assert (await client.complete(pending, query)).email == "ann@example.com"

    url, pending = await client.begin()
    form = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()} | {"decision": "deny"}
    async with http.post(issuer.url + "/authorize", data=form, allow_redirects=False) as response:
        query = dict(parse_qsl(urlsplit(response.headers["Location"]).query))
    assert query["error"] == "access_denied"
    with pytest.raises(SignInError) as info:
        await client.complete(pending, query)
    assert info.value.reason == "provider_error"


# ID token rules checked directly: the fake cannot be accounts.google.com.

_KEY = RSAKey.generate_key(2048, {"kid": "g1", "use": "sig", "alg": "RS256"})
_KEYS = KeySet([RSAKey.import_key(_KEY.as_dict(private=False))])


def _token(**overrides: object) -> str:
    now = int(time.time())
    claims = {
        "iss": GOOGLE_ISSUER,
        "aud": "cid",
        "sub": "s1",
        "email": "e@example.com",
        "email_verified": True,
        "iat": now,
        "exp": now + 600,
        "nonce": "n1",
    }
    claims.update(overrides)
    return jwt.encode({"alg": "RS256", "kid": "g1"}, {k: v for k, v in claims.items() if v is not None}, _KEY)


def _verify(token: str, issuer: str = GOOGLE_ISSUER) -> Identity:
    return verify_id_token(token, _KEYS, issuer=issuer, client_id="cid", nonce="n1", now=time.time())


def _reason(token: str, issuer: str = GOOGLE_ISSUER) -> str:
    with pytest.raises(SignInError) as info:
        _verify(token, issuer)
    return info.value.reason


def test_google_accepts_both_issuer_forms_and_nothing_else() -> None:
    assert accepted_issuers(GOOGLE_ISSUER) == {"https://accounts.google.com", "accounts.google.com"}
    assert accepted_issuers("https://login.example") == {"https://login.example"}
    for iss in ("https://accounts.google.com", "accounts.google.com"):
        assert _verify(_token(iss=iss)) == Identity("s1", "e@example.com")
    wrong: tuple[object, ...] = (
        "https://accounts.google.com/",
        "http://accounts.google.com",
        "ACCOUNTS.GOOGLE.COM",
        ["accounts.google.com"],
    )
    for bad in wrong:
        assert _reason(_token(iss=bad)) in {"issuer_mismatch", "invalid_token"}
    assert _reason(_token(iss="https://accounts.google.com/")) == "issuer_mismatch"
    # Google's short form is only Google's: another issuer gets exactly its own identifier.
    assert _reason(_token(iss="accounts.google.com"), issuer="https://login.example") == "issuer_mismatch"


def test_audience_rules() -> None:
    assert _verify(_token(aud=["cid", "other"], azp="cid")).sub == "s1"
    assert _reason(_token(aud=["cid", "other"])) == "wrong_audience"  # several audiences need azp
    assert _reason(_token(aud=["cid"], azp="other")) == "wrong_audience"
    assert _reason(_token(aud="other")) == "wrong_audience"


def test_claims_that_must_be_present_and_right() -> None:
    now = int(time.time())
    assert _reason(_token(nonce=None)) == "nonce_mismatch"
    assert _reason(_token(nonce="n2")) == "nonce_mismatch"
    assert _reason(_token(sub=None)) == "invalid_token"
    assert _reason(_token(email_verified=None)) == "email_unverified"
    assert _reason(_token(email_verified="false")) == "email_unverified"
    assert _verify(_token(email_verified="true")).email == "e@example.com"
    assert _reason(_token(email=None)) == "email_unverified"
    assert _reason(_token(iat=now - 700, exp=now - 61)) == "expired"
    assert _verify(_token(iat=now - 700, exp=now - 30)).sub == "s1"  # within the leeway
    assert _reason(_token(iat=now + 3600)) == "invalid_token"


def test_symmetric_or_unsigned_tokens_are_refused() -> None:
    # SECURITY: an HS256 token keyed with something public must not pass as the issuer's.
    secret = OctKey.import_key("cid-secret-that-is-long-enough-for-hs256")
    hs = jwt.encode({"alg": "HS256", "kid": "g1"}, {"iss": GOOGLE_ISSUER, "aud": "cid", "sub": "s1"}, secret)
    assert _reason(hs) == "invalid_token"
    header, payload, _sig = _token().split(".")
    assert _reason(f"{header}.{payload}.") in {"invalid_token", "bad_signature"}
    assert _reason("not-a-jwt") == "invalid_token"
    assert _reason(jwt.encode({"alg": "RS256", "kid": "nope"}, {"sub": "s1"}, _KEY)) == "unknown_key"
