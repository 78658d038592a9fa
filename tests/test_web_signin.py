"""Sign-in, sessions and CSRF over real HTTP: a local OIDC issuer, the real app, both Redis kinds."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.fernet import InvalidToken
from yarl import URL

from gateway.app import create_app
from gateway.appkeys import DEMO
from gateway.settings import Settings
from gateway.web.sessions import SESSION_MAX_AGE_S, fernet_for
from ledger.keys import Keyspace
from ledger.rebuild import rebuild
from tests.conftest import Clock
from tests.fakes.oidc import FakeUser, Fault
from tests.web_harness import SESSION_SECRET, Browser, WebGateway, _free_socket, running_web

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


def session_contents(browser: Browser) -> dict[str, object]:
    cookie = browser.cookie()
    assert cookie is not None
    data = orjson.loads(fernet_for(SESSION_SECRET).decrypt(cookie.encode()))
    session: dict[str, object] = data["session"]
    return session


async def test_good_sign_in_makes_one_account_by_sub_and_keeps_only_ids_in_the_cookie(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    user = FakeUser(sub="g-123", email="ann@example.com")
    async with running_web(redis_client, clean_keyspace, tmp_path, user=user) as w:
        b = w.browser()
        assert (await b.get("/api/account")).status == 401
        r = await w.sign_in(b)
        assert r.status == 303 and r.headers["Location"] == "/"
        account = (await b.get("/api/account")).json()
        assert account["email"] == "ann@example.com"
        assert account["currency"] == "THB"
        assert account["available_micro"] == 0 and account["buckets"] == []
        # SECURITY: the cookie holds ids only: no email, no sub, nothing from Google.
        session = session_contents(b)
        assert set(session) == {"account_id", "iat", "sid", "csrf", "ep"}  # ep: the ledger epoch
        assert session["account_id"] == account["account_id"]
        assert "ann@example.com" not in str(session) and "g-123" not in str(session)
        # The dashboard shows the balance.
        page = await b.get("/")
        assert page.status == 200 and 'id="available"' in page.text

        # The same sub with a changed email finds the same account.
        w.issuer.user = FakeUser(sub="g-123", email="ann.new@example.com")
        b2 = w.browser()
        await w.sign_in(b2)
        again = (await b2.get("/api/account")).json()
        assert again["account_id"] == account["account_id"]
        assert await w.ledger.find_account_by_sub("g-123") == account["account_id"]
        # ... and the account now shows the new address, in Redis and (after the journal) SQLite.
        assert again["email"] == "ann.new@example.com"


async def test_first_sign_in_grants_trial_credit_once(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(
        redis_client,
        clean_keyspace,
        tmp_path,
        trial_credit_micro=5_000_000,
        trial_life_s=7 * 86400,
        low_balance_default_micro=10_000_000,
    ) as w:
        b = w.browser()
        await w.sign_in(b)
        await w.sign_in(b)  # a second sign-in is not a new account: no second trial
        account = (await b.get("/api/account")).json()
        assert [x["source"] for x in account["buckets"]] == ["trial"]
        assert account["available_micro"] == 5_000_000
        # Default low-balance threshold applied at creation: 5 < 10 THB shows as low, on the page too.
        assert account["low_balance"] is True and account["low_threshold_micro"] == 10_000_000
        assert "low_balance" in account["warnings"]
        page = (await b.get("/")).text
        assert 'id="warn-low"' in page
        # The trial bucket lives 7 days: it warns as expiring within a week.
        assert account["buckets"][0]["expiring_soon"] is True
        assert 'class="warn-expiry"' in page


FAULTS = [
    (Fault.WRONG_AUDIENCE, "wrong_audience", 401),
    (Fault.BAD_SIGNATURE, "bad_signature", 401),
    (Fault.EXPIRED, "expired", 401),
    (Fault.WRONG_NONCE, "nonce_mismatch", 401),
    (Fault.DENY, "provider_error", 401),
    (Fault.WRONG_ISSUER, "issuer_mismatch", 401),
    (Fault.TOKEN_ERROR, "token_exchange_failed", 401),
]


@pytest.mark.parametrize(("fault", "reason", "status"), FAULTS, ids=[f[1] for f in FAULTS])
async def test_refused_sign_in_shows_the_reason_and_leaves_no_session(
    redis_client: aioredis.Redis,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    fault: Fault,
    reason: str,
    status: int,
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        w.issuer.faults.add(fault)
        b = w.browser()
        r = await w.sign_in(b)
        assert r.status == status
        assert r.headers["Content-Type"].startswith("text/html")
        assert f'<code id="reason">{reason}</code>' in r.text
        assert "Sign-in failed" in r.text
        assert (await b.get("/api/account")).status == 401
        assert 'id="google-signin"' in (await b.get("/")).text
        assert await w.ledger.account_ids() == []


async def test_unverified_email_is_refused(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    user = FakeUser(sub="g-9", email="eve@example.com", email_verified=False)
    async with running_web(redis_client, clean_keyspace, tmp_path, user=user) as w:
        b = w.browser()
        r = await w.sign_in(b)
        assert r.status == 403 and '<code id="reason">email_unverified</code>' in r.text
        assert "verified email" in r.text
        assert (await b.get("/api/account")).status == 401
        assert await w.ledger.account_ids() == []


async def test_replayed_state_is_refused_even_with_the_old_cookie(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        callback = await w.begin_sign_in(b)
        pending_cookie = b.cookie()
        assert pending_cookie is not None
        assert (await b.get(callback)).status == 303
        # An attacker (or a back button) replays the callback with the cookie from before it.
        replay = w.browser()
        replay.session.cookie_jar.update_cookies({"cp_session": pending_cookie}, URL(w.url))
        r = await replay.get(callback)
        assert r.status == 400 and '<code id="reason">replayed_state</code>' in r.text
        assert (await replay.get("/api/account")).status == 401
        # And the callback with no sign-in in progress at all.
        fresh = w.browser()
        r = await fresh.get(callback)
        assert r.status == 400 and '<code id="reason">state_mismatch</code>' in r.text
        assert (await fresh.get("/api/account")).status == 401


async def test_session_cookie_flags_and_rotation(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        r = await b.get("/auth/google")
        before = b.cookie()
        callback = str((await b.get(r.headers["Location"])).headers["Location"])
        r = await b.get(callback)
        cookie = r.headers["Set-Cookie"]
        assert cookie.startswith("cp_session=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        assert f"Max-Age={SESSION_MAX_AGE_S}" in cookie
        assert "Secure" not in cookie  # plain http on loopback
        # Rotated at sign-in: the signed-in session is a new one (new sid and CSRF token).
        assert b.cookie() != before
    # Served over https: Secure and the __Host- prefix.
    async with running_web(
        redis_client, clean_keyspace, tmp_path / "https", public_base_url="https://plan.example"
    ) as w:
        b = w.browser()
        r = await b.get("/auth/google")
        cookie = r.headers["Set-Cookie"]
        assert cookie.startswith("__Host-cp_session=")
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


async def test_sign_out_ends_the_session_and_a_copied_cookie_stops_working(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        copied = b.cookie()
        assert copied is not None
        token = await w.csrf(b)
        # Without the token: refused.
        assert (await b.post("/auth/logout", data={})).status == 403
        assert (await b.get("/api/account")).status == 200
        r = await b.post("/auth/logout", data={"csrf_token": token})
        assert r.status == 303
        assert (await b.get("/api/account")).status == 401
        thief = w.browser()
        thief.session.cookie_jar.update_cookies({"cp_session": copied}, URL(w.url))
        assert (await thief.get("/api/account")).status == 401


async def test_a_signed_out_session_stays_out_after_redis_loss_and_rebuild(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        copied = b.cookie()
        assert copied is not None
        token = await w.csrf(b)
        assert (await b.post("/auth/logout", data={"csrf_token": token})).status == 303
        still_in = w.browser()
        await w.sign_in(still_in)  # signed in, never signed out
        await w.worker.drain_once()
        # Redis restarts empty: the ledger and the list of ended sessions go with it.
        lost = [k async for k in redis_client.scan_iter(match=f"{clean_keyspace.prefix}:*")]
        await redis_client.delete(*lost)
        await rebuild(w.ledger, w.store)
        thief = w.browser()
        thief.session.cookie_jar.update_cookies({"cp_session": copied}, URL(w.url))
        assert (await thief.get("/api/account")).status == 401
        # Sessions die with the ledger's epoch, consistently: everyone signs in again.
        assert (await still_in.get("/api/account")).status == 401
        again = w.browser()
        await w.sign_in(again)
        assert (await again.get("/api/account")).status == 200


async def test_session_has_an_absolute_lifetime(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    import time

    clock = Clock(time.time())
    async with running_web(redis_client, clean_keyspace, tmp_path, clock=clock) as w:
        b = w.browser()
        await w.sign_in(b)
        clock.advance(SESSION_MAX_AGE_S - 60)
        assert (await b.get("/api/account")).status == 200
        clock.advance(120)
        assert (await b.get("/api/account")).status == 401


async def test_csrf_is_required_for_every_state_changing_call(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        token = await w.csrf(b)
        key = (await b.post("/api/keys", headers={"X-CSRF-Token": token})).json()
        calls = [
            ("POST", "/api/keys", None),
            ("POST", f"/api/keys/{key['key_id']}/renew", None),
            ("DELETE", f"/api/keys/{key['key_id']}", None),
            ("POST", "/api/account/low-balance", {"amount": "5"}),
            ("POST", "/api/account/close", {"confirm": True}),
        ]
        for method, path, body in calls:
            for headers in ({}, {"X-CSRF-Token": "wrong"}):
                r = await b.request(method, path, json=body, headers=headers)
                assert r.status == 403, (method, path, headers)
                assert r.json()["error"]["type"] == "permission_error"
        # A right token from another site (Origin) is refused too.
        r = await b.post("/api/keys", headers={"X-CSRF-Token": token, "Origin": "https://evil.example"})
        assert r.status == 403
        # HTML forms: the same rule, answered with a page.
        for path, form in (
            ("/keys", {}),
            ("/account/close", {"confirm": "yes"}),
            ("/account/low-balance", {"amount": "1"}),
        ):
            r = await b.post(path, data=form)
            assert r.status == 403 and "CSRF" in r.text, path
        # Nothing changed: one key, account open.
        assert len((await b.get("/api/keys")).json()["keys"]) == 1
        assert (await w.ledger.account((await b.get("/api/account")).json()["account_id"])) is not None
        # With the token, from our own origin, it works.
        r = await b.post("/api/keys", headers={"X-CSRF-Token": token, "Origin": w.url})
        assert r.status == 201


async def test_sign_in_page_says_when_google_is_not_configured(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(
        redis_client, clean_keyspace, tmp_path, google_client_id=None, google_client_secret=None
    ) as w:
        b = w.browser()
        page = (await b.get("/")).text
        assert 'id="signin-unconfigured"' in page and "not configured" in page
        assert 'id="demo-signin"' not in page  # not embedded: no demo sign-in
        r = await b.get("/auth/google")
        assert r.status == 503 and "not configured" in r.text
        assert (await b.post("/auth/demo", data={})).status == 404


async def test_embedded_demo_sign_in_opens_the_demo_dashboard(tmp_path: Path) -> None:
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        database_path=tmp_path / "var" / "gw.sqlite3", public_base_url=url, shutdown_grace_s=1.0
    )
    assert settings.embedded and not settings.google_enabled
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    w = WebGateway(url, app, None, None, None, None, settings)  # type: ignore[arg-type]
    try:
        b = w.browser()
        page = (await b.get("/")).text
        assert 'id="demo-signin"' in page and "not for production" in page
        token = page.split('name="csrf_token" value="')[1].split('"')[0]
        assert (await b.post("/auth/demo", data={})).status == 403
        r = await b.post("/auth/demo", data={"csrf_token": token})
        assert r.status == 303
        account = (await b.get("/api/account")).json()
        assert account["account_id"] == app[DEMO][0]
        assert account["email"] == "demo@localhost" and account["available_micro"] > 0
    finally:
        await w.close()
        await runner.cleanup()


def test_fernet_key_is_derived_from_any_length_secret() -> None:
    a, b = fernet_for(b"x" * 32), fernet_for(b"y" * 100)
    token = a.encrypt(b"ids")
    assert a.decrypt(token) == b"ids"
    with pytest.raises(InvalidToken):
        b.decrypt(token)


async def test_coding_tool_routes_never_touch_the_session(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        key = (await b.post("/api/keys", headers={"X-CSRF-Token": await w.csrf(b)})).json()["key"]
        # A browser cookie alongside an API key: /v1 neither reads it for auth nor writes it back.
        r = await b.get("/v1/balance", headers={"Authorization": f"Bearer {key}"})
        assert r.status == 200 and "Set-Cookie" not in r.headers
        r = await b.get("/v1/balance")
        assert r.status == 401 and "Set-Cookie" not in r.headers
