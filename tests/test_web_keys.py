"""API keys from the dashboard: at most two, the full key in exactly one response, only hashes stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace, hash_api_key
from tests.fakes.oidc import FakeUser
from tests.web_harness import WebGateway, redis_dump, running_web, sqlite_dump

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


async def v1_balance(w: WebGateway, key: str) -> int:
    b = w.browser()
    return (await b.get("/v1/balance", headers={"Authorization": f"Bearer {key}"})).status


async def test_third_key_is_refused_and_each_key_appears_in_exactly_one_response(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        token = await w.csrf(b)
        h = {"X-CSRF-Token": token}
        first = await b.post("/api/keys", headers=h)
        assert first.status == 201
        k1 = first.json()
        assert k1["key"].startswith("cpk_") and k1["prefix"] == k1["key"][:12]
        assert k1["config"]["claude_code"] == {"ANTHROPIC_BASE_URL": w.url, "ANTHROPIC_AUTH_TOKEN": k1["key"]}
        assert k1["config"]["openai"] == {"base_url": w.url + "/v1", "api_key": k1["key"]}
        # The second through the HTML form (works without JavaScript): the page shows it once.
        page = await b.post("/keys", data={"csrf_token": token})
        assert page.status == 200 and page.headers["Cache-Control"] == "no-store"
        k2 = page.text.split('<code id="new-key">')[1].split("<")[0]
        assert k2.startswith("cpk_")
        assert f'export ANTHROPIC_BASE_URL="{w.url}"' in page.text
        assert f'export ANTHROPIC_AUTH_TOKEN="{k2}"' in page.text
        assert f'export OPENAI_BASE_URL="{w.url}/v1"' in page.text
        assert f'base_url = "{w.url}/v1"' in page.text and 'wire_api = "responses"' in page.text  # Codex
        assert [s["slug"] for s in k1["setups"]] == ["claude", "codex", "openai", "python"]
        assert k1["config"]["codex"] == {"base_url": w.url + "/v1", "env_key": "CODINGPLAN_API_KEY", "wire_api": "responses"}
        assert 'data-copy="new-key"' in page.text

        third = await b.post("/api/keys", headers=h)
        assert third.status == 409 and "at most 2" in third.json()["error"]["message"]
        page = await b.post("/keys", data={"csrf_token": token})
        assert page.status == 409 and "at most 2" in page.text
        keys_page = await b.get("/keys")
        assert 'id="keys-full"' in keys_page.text and 'id="create-key"' not in keys_page.text

        listed = (await b.get("/api/keys")).json()
        assert listed["max_keys"] == 2
        # Oldest first; two keys made within the same millisecond may list in either order.
        assert sorted(k["prefix"] for k in listed["keys"]) == sorted([k1["prefix"], k2[:12]])
        created = [k["created_at"] for k in listed["keys"]]
        assert created == sorted(created)
        assert all(set(k) == {"key_id", "prefix", "created_at", "last_used_at"} for k in listed["keys"])
        # Both keys work for the coding tools.
        assert await v1_balance(w, k1["key"]) == 200 and await v1_balance(w, k2) == 200

        # Exactly one response body (of every response this test received) holds each full key.
        for key in (k1["key"], k2):
            assert sum(key.encode() in body for body in w.bodies) == 1, key


async def test_only_hashes_of_keys_are_stored_in_redis_and_sqlite(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        h = {"X-CSRF-Token": await w.csrf(b)}
        k1 = (await b.post("/api/keys", headers=h)).json()
        renewed = (await b.post(f"/api/keys/{k1['key_id']}/renew", headers=h)).json()
        k2 = (await b.post("/api/keys", headers=h)).json()
        await w.drain()
        redis_values = await redis_dump(redis_client, clean_keyspace.prefix)
        sql_values = sqlite_dump(w.settings.history_target)
        for key in (k1["key"], renewed["key"], k2["key"]):
            # The secret part (after the prefix shown in lists) is nowhere, in no form but its hash.
            secret = key[12:]
            assert not any(secret in v for v in redis_values), "a key in Redis"
            assert not any(secret in v for v in sql_values), "a key in SQLite"
        for key in (renewed["key"], k2["key"]):
            assert hash_api_key(key) in redis_values
            assert hash_api_key(key) in sql_values


async def test_renewed_key_stops_working_at_once_and_the_new_one_works(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        token = await w.csrf(b)
        old = (await b.post("/api/keys", headers={"X-CSRF-Token": token})).json()
        assert await v1_balance(w, old["key"]) == 200
        r = await b.post(f"/api/keys/{old['key_id']}/renew", headers={"X-CSRF-Token": token})
        assert r.status == 201
        new = r.json()
        assert new["replaces"] == old["key_id"] and new["key"] != old["key"]
        assert await v1_balance(w, old["key"]) == 401
        assert await v1_balance(w, new["key"]) == 200
        # Renewing the dead key again is "not found".
        assert (
            await b.post(f"/api/keys/{old['key_id']}/renew", headers={"X-CSRF-Token": token})
        ).status == 404
        # Renew through the form shows the new key once and kills the previous one.
        page = await b.post(f"/keys/{new['key_id']}/renew", data={"csrf_token": token})
        assert page.status == 200 and "Your old key has stopped working" in page.text
        newest = page.text.split('<code id="new-key">')[1].split("<")[0]
        assert await v1_balance(w, new["key"]) == 401
        assert await v1_balance(w, newest) == 200
        # Revoke through the form.
        key_id = (await b.get("/api/keys")).json()["keys"][0]["key_id"]
        r = await b.post(f"/keys/{key_id}/revoke", data={"csrf_token": token})
        assert r.status == 303 and r.headers["Location"] == "/keys"
        assert await v1_balance(w, newest) == 401
        assert (await b.get("/api/keys")).json()["keys"] == []


@pytest.mark.parametrize("method", ["renew", "revoke"])
async def test_a_user_cannot_touch_another_accounts_key(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, method: str
) -> None:
    async with running_web(
        redis_client, clean_keyspace, tmp_path, user=FakeUser(sub="a", email="a@x.example")
    ) as w:
        alice = w.browser()
        await w.sign_in(alice)
        alice_key = (await alice.post("/api/keys", headers={"X-CSRF-Token": await w.csrf(alice)})).json()
        w.issuer.user = FakeUser(sub="b", email="b@x.example")
        bob = w.browser()
        await w.sign_in(bob)
        token = await w.csrf(bob)
        if method == "renew":
            r = await bob.post(f"/api/keys/{alice_key['key_id']}/renew", headers={"X-CSRF-Token": token})
            page = await bob.post(f"/keys/{alice_key['key_id']}/renew", data={"csrf_token": token})
        else:
            r = await bob.delete(f"/api/keys/{alice_key['key_id']}", headers={"X-CSRF-Token": token})
            page = await bob.post(f"/keys/{alice_key['key_id']}/revoke", data={"csrf_token": token})
        assert r.status == 404 and page.status == 404
        assert await v1_balance(w, alice_key["key"]) == 200
        # Garbage ids are "not found" too, never a 500.
        r = await bob.delete("/api/keys/not-a-key", headers={"X-CSRF-Token": token})
        assert r.status == 404


async def test_key_routes_need_a_session(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        for method, path in (
            ("GET", "/api/keys"),
            ("POST", "/api/keys"),
            ("DELETE", "/api/keys/key_00abcdef"),
        ):
            r = await b.request(method, path, headers={"X-CSRF-Token": "x"})
            assert r.status == 401, path
        r = await b.get("/keys")
        assert r.status == 303 and r.headers["Location"] == "/"
