"""The hot path: authenticate, reserve, forward, stream, settle.

Same format on both sides: upstream bytes go to the client as they arrive and are parsed on the side
for usage; nothing is re-encoded. Different formats: each upstream event is parsed once and fed to a
translator that emits the client's events. Either way the bill is settled from ``finally``
(gateway.settlement), out of the cancellation's reach, so a disconnect, an upstream death or a
shutdown still charges what was produced and releases the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ledger import errors as LE
from ledger.ledger import Ledger
from ledger.spool import Spool

from . import errors as E
from .appkeys import REQUEST_ID
from .auth import REVOKED, KeyCache, authenticate_cached
from .clientbody import WHOLE_BELOW_BYTES, ClientBody, parse_body
from .exchange import Exchange
from .formats import FORMATS, ClientFormat, Outgoing, ReplyContext
from .jsonbody import check_depth, read_raw
from .metrics import Metrics
from .models import Model, Registry
from .rawjson import patched
from .relay import echo_model, relay_stream
from .settings import Settings
from .settlement import Settlements

__all__ = ["Proxy"]

log = logging.getLogger("gateway.proxy")

def _amount(micro: int) -> str:
    """Micro-units as currency for people: 54_000 -> '0.054', 12_500_000 -> '12.50'."""
    whole, frac = divmod(micro, 1_000_000)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{whole}.{digits}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _cost(tokens_: int, price_micro_per_m: int) -> int:
    return _ceil_div(tokens_ * price_micro_per_m, 1_000_000)


class Proxy:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        ledger: Ledger,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        background: set[asyncio.Future[Any]],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ledger = ledger
        self.http = http
        self.metrics = metrics
        self.live: dict[str, str] = {}  # request_id -> account_id, for the reservation heartbeat
        # The same requests' bookkeeping, for the progress notes a process killed with -9 leaves.
        self.exchanges: dict[str, Exchange] = {}
        self.settlements = Settlements(ledger, metrics, background)
        self.key_cache = KeyCache()
        self._user_tags: dict[str, str] = {}
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.upstream_connect_timeout_s,
            sock_connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_idle_timeout_s,
        )
        self.internal_token = ""  # the demo model's loopback credential, set by the app
        # Set when the server shuts down: a stream cancelled then is recorded as cut by us, not by the
        # client, so a disputed charge can be told apart.
        self.shutting_down = False
        self.shutdown_deadline = 0.0  # loop time by which the process must be gone (set at SIGTERM)

    # ----- request intake ----------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, FORMATS["openai"])

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, FORMATS["anthropic"])

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, FORMATS["responses"])

    async def responses_compact(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, FORMATS["responses_compact"])

    def _model(self, name: str) -> Model:
        model = self.registry.get(name)
        if model is None:
            raise E.NotFound(f"Model '{name}' is not available here; GET /v1/models lists the models.", param="model")
        return model

    def _user_tag(self, key_id: str) -> str:
        # Stands in for a client's own user id upstream (Claude Code's metadata.user_id carries its
        # device and session ids): stable per key, meaningless outside the gateway. Kept per key (an
        # HMAC a request is measurable on the small-request path); the map is bounded.
        tag = self._user_tags.get(key_id)
        if tag is None:
            mac = hmac.new(self.settings.session_secret, key_id.encode(), hashlib.sha256).hexdigest()
            tag = f"cp_{mac[:32]}"
            if len(self._user_tags) >= 4096:
                self._user_tags.clear()
            self._user_tags[key_id] = tag
        return tag

    def _insufficient(self, needed: int, available: int, useful: int) -> E.InsufficientCredit:
        currency = self.registry.currency
        return E.InsufficientCredit(
            f"Not enough credit for this request: it needs {_amount(needed)} {currency} "
            f"(the prompt plus {useful} output tokens) and {_amount(available)} {currency} is available. "
            f"Top up at {self.settings.public_base_url.rstrip('/')}/topup and retry.",
            headers={"x-should-retry": "false"},
            fields={"available_micro": available, "needed_micro": needed},
        )

    async def _handle(self, request: web.Request, client: ClientFormat) -> web.StreamResponse:
        key, key_hash = await authenticate_cached(request, self.ledger, self.key_cache)
        raw = await read_raw(request)
        body = parse_body(raw, lambda name: self._summary_plan(client, name), whole_below=WHOLE_BELOW_BYTES)
        intake = client.intake(body.head)
        model = self._model(intake.model_name)
        route = client.routes[model.provider.format]
        if not route.passthrough:
            check_depth(body.head)  # translators recurse; a passthrough forwards the body unwalked
        request_id: str = request[REQUEST_ID]
        prompt = client.estimate_input(body)  # an upper bound now; exact only if needed
        requested_out = min(intake.requested_output or model.max_output_tokens, model.max_output_tokens)
        started_ms = self.ledger.now_ms()
        prices = model.prices_at(started_ms)  # a price window is chosen by the request's start
        input_price = max(prices.miss, prices.write)
        useful = min(self.settings.min_output_tokens, requested_out)
        input_cost = _cost(prompt.bound, input_price)
        while True:
            # Ceiling: every input token at the dearer of miss/write, plus the output cap.
            ceiling = input_cost + _cost(requested_out, prices.out)
            minimum = input_cost + _cost(useful, prices.out)
            try:
                held = await self._reserve(key.account_id, key.key_id, key_hash, request_id, ceiling, minimum)
            except LE.InsufficientFunds as err:
                if not prompt.is_exact:
                    # The bound did not fit: the exact count may (nothing was held, retry).
                    input_cost = _cost(await prompt.exact(), input_price)
                    minimum = input_cost + _cost(useful, prices.out)
                    if minimum <= err.available_micro:
                        continue
                raise self._insufficient(minimum, err.available_micro, useful) from None
            break
        max_tokens = requested_out
        if held < ceiling and prices.out > 0:
            if not prompt.is_exact:
                try:
                    input_cost = _cost(await prompt.exact(), input_price)  # less input, more output
                except BaseException:
                    self._in_background(self._release_abandoned(key.account_id, request_id))  # held
                    raise
            # Lower the output cap to what the balance affords rather than refuse.
            max_tokens = max(useful, min(requested_out, (held - input_cost) * 1_000_000 // prices.out))
        ex = Exchange(
            request_id=request_id,
            account_id=key.account_id,
            key_id=key.key_id,
            model=model,
            client_model=intake.model_name,
            client=client,
            route=route,
            stream=intake.stream,
            include_usage=intake.include_usage,
            prompt=prompt,
            max_tokens=max_tokens,
            started_ms=started_ms,
            prices=prices,
        )
        self.live[request_id] = key.account_id
        self.exchanges[request_id] = ex
        try:
            return await self._forward(request, ex, body)
        except asyncio.CancelledError:
            ex.status = "shutdown" if self.shutting_down else "client_disconnect"
            raise
        except E.BadRequest:
            # A field the upstream's format cannot carry, refused by the translator before anything
            # was sent: a client error like any other 400, so nothing is billed or metered.
            ex.status = "bad_request"
            raise
        except E.GatewayError:
            if ex.status == "ok":
                ex.status = "upstream_error"
            raise
        except BaseException:
            ex.status = "internal_error"
            raise
        finally:
            self.live.pop(request_id, None)
            self.exchanges.pop(request_id, None)
            # Settle off the response path: a non-streamed answer goes out now, and a keep-alive
            # connection's next request does not queue behind this one's Redis round trip. Nothing
            # tied to this handler, so a cancellation (client gone) cannot stop it; shutdown waits
            # for every pending settlement.
            self.settlements.soon(ex)

    async def _reserve(
        self, account_id: str, key_id: str, key_hash: str, request_id: str, ceiling: int, minimum: int
    ) -> int:
        try:
            return await self.ledger.reserve(
                account_id,
                request_id,
                ceiling,
                key_id=key_id,
                min_micro=minimum,
                concurrency_limit=self.settings.key_concurrency_limit,
                key_hash=key_hash,
            )
        except asyncio.CancelledError:
            # The client left while the reserve was on its way: Redis may still make the hold. The
            # release follows it (on the script lane, in order; if it overtakes it on another
            # connection, release.lua leaves the request finished and the reserve holds nothing).
            self._in_background(self._release_abandoned(account_id, request_id))
            raise
        except LE.UnknownKey:
            self.key_cache.drop(key_hash)  # revoked since it was cached: the reserve script said so
            raise E.Unauthorized(REVOKED) from None

    @property
    def spool(self) -> Spool | None:
        """Settlements Redis did not take wait here (on disk) until it does; None: log and lose them."""
        return self.settlements.spool

    @spool.setter
    def spool(self, spool: Spool | None) -> None:
        self.settlements.spool = spool

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        self.settlements.in_background(coro)

    async def _release_abandoned(self, account_id: str, request_id: str) -> None:
        try:
            await self.ledger.release(account_id, request_id, reason="client_disconnect")
        except Exception as exc:
            # A hold made all the same is released by the worker's stale sweep after its deadline.
            log.warning("release failed request_id=%s error=%s", request_id, type(exc).__name__)

    # ----- upstream -------------------------------------------------------------------------------
    def _summary_plan(self, client: ClientFormat, name: Any) -> tuple[frozenset[str], str] | None:
        """For gateway.clientbody: leave the big members unread when the request will go upstream in
        the client's own format (a passthrough route), else parse it whole."""
        if not client.big_members or not isinstance(name, str):
            return None
        model = self.registry.get(name)
        route = client.routes.get(model.provider.format) if model is not None else None
        if route is None or not route.passthrough:
            return None
        return client.big_members, client.count_format

    def _upstream_request(
        self, request: web.Request, ex: Exchange, body: ClientBody
    ) -> tuple[str, dict[str, str], bytes]:
        provider = ex.model.provider
        betas = request.headers.get("anthropic-beta", "") if ex.client.anthropic_headers else ""
        outgoing = Outgoing(
            model=ex.model, max_tokens=ex.max_tokens, names=ex.names, user_tag=self._user_tag(ex.key_id), betas=betas
        )
        out = ex.route.request(body.head, outgoing)
        ex.body, ex.route_state = body.head, outgoing.state
        if ex.upstream_fmt == "openai" and ex.stream:
            out["stream"] = True
            options = out.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                out["stream_options"] = {**(options or {}), "include_usage": True}
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if ex.stream else "application/json"}
        if ex.upstream_fmt == "openai":
            api_key = self.internal_token if provider.internal else provider.api_key
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
        else:
            if ex.client.anthropic_headers:
                # Open lists: every anthropic-* header (betas above all: new ones arrive with each
                # Claude Code release) goes on unchanged.
                headers.update((k.lower(), v) for k, v in request.headers.items() if k.lower().startswith("anthropic-"))
            if provider.api_key:
                headers["x-api-key"] = provider.api_key
            headers.setdefault("anthropic-version", "2023-06-01")
        url = provider.endpoint
        if provider.internal:
            # The demo upstream is this very server: call it on the socket the request came in on.
            host, port = request.transport.get_extra_info("sockname")[:2] if request.transport else ("127.0.0.1", 0)
            host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
            url = f"http://{host}:{port}/_demo/v1/chat/completions"
        # A passthrough's edit is shallow: the client's bytes go on when it changed nothing, or only
        # added members; otherwise (and always for a translation) the edited object is encoded.
        try:
            payload = patched(body, out) if ex.route.passthrough else orjson.dumps(out)
        except orjson.JSONEncodeError:
            # A same-format body is not checked for depth (nothing walks it), but one that must be
            # encoded again and is nested past what orjson encodes cannot go: refused, nothing held.
            raise E.BadRequest("Request body is nested too deeply to forward.") from None
        return url, headers, payload

    async def _forward(self, request: web.Request, ex: Exchange, body: ClientBody) -> web.StreamResponse:
        url, headers, payload = self._upstream_request(request, ex, body)
        provider = ex.model.provider
        if provider.api_key is None and not provider.internal:
            raise E.UpstreamError(
                f"Provider '{provider.name}' has no API key configured ({provider.api_key_env} is unset)."
            )
        t0 = time.perf_counter()
        try:
            up = await self.http.post(url, data=payload, headers=headers, timeout=self.timeout)
            # Sent: a rewritten copy of an agent's ~400 KB body need not live as long as the stream.
            del payload
        except TimeoutError:
            ex.status = "upstream_timeout"
            raise E.UpstreamTimeout("The upstream model service did not answer in time; retry.") from None
        except aiohttp.ClientError:
            ex.status = "upstream_error"
            raise E.UpstreamError("Could not reach the upstream model service; retry.") from None
        try:
            first_byte_s = time.perf_counter() - t0
            if up.status != 200:
                return await self._upstream_failure(ex, up)
            if ex.stream:
                return await self._relay_stream(request, ex, up)
            return await self._relay_body(ex, up)
        finally:
            up.close()  # on a disconnect or error this aborts the upstream request at once
            self.metrics.upstream(provider.name, first_byte_s, time.perf_counter() - t0)

    async def _upstream_failure(self, ex: Exchange, up: aiohttp.ClientResponse) -> web.Response:
        ex.status = "upstream_error"
        try:
            raw = await up.read()
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        status = up.status
        headers = {"x-request-id": ex.request_id}
        if "retry-after" in up.headers:
            headers["retry-after"] = up.headers["retry-after"]
        if status in (401, 402, 403):
            # The upstream refused our provider credentials or quota: ours to fix, not the user's to
            # top up or log in again for (SPEC 5).
            raise E.UpstreamError("The upstream provider refused our credentials or quota.", headers=headers)
        if ex.route.error is None and raw:
            # Same format: the upstream's status and body unchanged (Claude Code's recovery reads the
            # wording).
            ctype = up.headers.get("Content-Type", "application/json")
            return web.Response(status=status, body=raw, headers={**headers, "Content-Type": ctype})
        try:
            err_body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            err_body = {}
        if not isinstance(err_body, dict):
            err_body = {}
        if ex.route.error is not None:
            err_body = ex.route.error(status, err_body)
        return web.Response(status=status, body=orjson.dumps(err_body), content_type="application/json", headers=headers)

    @staticmethod
    def _reply_context(ex: Exchange, input_estimate: int) -> ReplyContext:
        # A whole upstream response carries its own usage: only streams need an input estimate.
        return ReplyContext(
            client_model=ex.client_model,
            request_id=ex.request_id,
            input_estimate=input_estimate,
            include_usage=ex.include_usage,
            names=ex.names,
            body=ex.body,
            state=ex.route_state,
        )

    async def _relay_body(self, ex: Exchange, up: aiohttp.ClientResponse) -> web.Response:
        try:
            raw = await up.read()
            obj = orjson.loads(raw)
        except TimeoutError:
            ex.status = "upstream_timeout"
            raise E.UpstreamTimeout("The upstream model service stopped answering; retry.") from None
        except (aiohttp.ClientError, orjson.JSONDecodeError):
            ex.status = "upstream_error"
            raise E.UpstreamError("The upstream model service sent a broken response; retry.") from None
        ex.tracker.observe_response(obj)
        ex.produced = True
        if ex.route.response is not None:
            raw = orjson.dumps(ex.route.response(obj, self._reply_context(ex, 0)))
        else:
            raw = echo_model(raw, ex.model.upstream_model, ex.client_model)
        return web.Response(body=raw, content_type="application/json", headers={"x-request-id": ex.request_id})

    async def _relay_stream(self, request: web.Request, ex: Exchange, up: aiohttp.ClientResponse) -> web.StreamResponse:
        translator = None
        if ex.route.stream is not None:
            # A translator may announce the input count before the upstream reports it (Anthropic's
            # message_start): the exact count, cheap for agents whose earlier turns are cached.
            translator = ex.route.stream(self._reply_context(ex, await ex.prompt.exact()))
        self.metrics.active_streams += 1
        try:
            return await relay_stream(request, ex, up, translator)
        finally:
            self.metrics.active_streams -= 1
