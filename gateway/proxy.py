"""The hot path: authenticate, reserve, forward, stream, settle.

Same format on both sides: upstream bytes go to the client as they arrive and are parsed on the side
for usage; nothing is re-encoded. Different formats: each upstream event is parsed once and fed to a
translator that emits the client's events. Either way the bill is settled in ``finally``, shielded
from cancellation, so a disconnect, an upstream death or a shutdown still charges what was produced
and releases the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ledger import errors as LE
from ledger.ledger import Ledger, Settlement
from ledger.money import iso_ms

from . import errors as E
from . import tokens
from .appkeys import REQUEST_ID
from .auth import REVOKED, KeyCache, authenticate_cached
from .jsonbody import read_json_object
from .metrics import Metrics
from .models import Model, Prices, Registry
from .settings import Settings
from .sse import DONE, SSEParser, format_json_event
from .translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    ToolNameMap,
    anthropic_error_to_openai,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_error_to_anthropic,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)
from .usage import Usage, UsageTracker, charge_micro

__all__ = ["Proxy"]

log = logging.getLogger("gateway.proxy")

# About 40 s of retries in all: well inside a reservation's 300 s deadline.
SETTLE_ATTEMPTS = 12

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(slots=True)
class Exchange:
    """One request's bookkeeping: ids and counts only, never content."""

    request_id: str
    account_id: str
    key_id: str
    model: Model
    client_fmt: str
    stream: bool
    include_usage: bool
    input_estimate: int
    max_tokens: int
    started_ms: int
    prices: Prices
    status: str = "ok"
    produced: bool = False
    tracker: UsageTracker = field(init=False)
    names: ToolNameMap | None = None

    def __post_init__(self) -> None:
        self.tracker = UsageTracker(self.model.provider.format)

    @property
    def translated(self) -> bool:
        return self.client_fmt != self.model.provider.format


@functools.lru_cache(maxsize=1024)
def _model_patterns(up_name: str, client_name: str) -> tuple[bytes, bytes, bytes, bytes]:
    # Built once per model pair, not per chunk: encoding them on every chunk cost ~45 us a request.
    up_b = orjson.dumps(up_name)
    cl_b = orjson.dumps(client_name)
    return b'"model":' + up_b, b'"model":' + cl_b, b'"model": ' + up_b, b'"model": ' + cl_b


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
        background: set[asyncio.Task[None]],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ledger = ledger
        self.http = http
        self.metrics = metrics
        self.background = background
        self.live: dict[str, str] = {}  # request_id -> account_id, for the reservation heartbeat
        self.key_cache = KeyCache()
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

    # ----- request intake ----------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic")

    def _validate(self, body: dict[str, Any], fmt: str) -> Model:
        model_name = body.get("model")
        if not isinstance(model_name, str) or not model_name:
            raise E.BadRequest("'model' is required and must be a string.", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise E.BadRequest("'messages' is required and must be a non-empty array.", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise E.BadRequest(f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
        if fmt == "anthropic":
            mt = body.get("max_tokens")
            if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
                raise E.BadRequest("'max_tokens' is required and must be a positive integer.", param="max_tokens")
        else:
            for name in ("max_tokens", "max_completion_tokens"):
                mt = body.get(name)
                if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
                    raise E.BadRequest(f"'{name}' must be a positive integer.", param=name)
            if body.get("n") not in (None, 1):
                raise E.BadRequest("Only n=1 is supported.", param="n")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise E.BadRequest("'stream' must be a boolean.", param="stream")
        # Checked here, before the reservation: read after it, a string or a list raised there and
        # left the hold and the key's concurrency slot taken until the stale sweep.
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise E.BadRequest("'stream_options' must be an object.", param="stream_options")
        model = self.registry.get(model_name)
        if model is None:
            raise E.NotFound(
                f"Model '{model_name}' is not available here; GET /v1/models lists the models.", param="model"
            )
        return model

    def _requested_output(self, body: dict[str, Any], fmt: str, model: Model) -> int:
        if fmt == "anthropic":
            asked = int(body["max_tokens"])
        else:
            asked = body.get("max_completion_tokens") or body.get("max_tokens") or model.max_output_tokens
        return int(min(asked, model.max_output_tokens))

    async def _handle(self, request: web.Request, fmt: str) -> web.StreamResponse:
        key, key_hash = await authenticate_cached(request, self.ledger, self.key_cache)
        body = await read_json_object(request)
        model = self._validate(body, fmt)
        request_id: str = request[REQUEST_ID]
        if fmt == "anthropic":
            input_estimate = await tokens.count_anthropic_request_async(body)
        else:
            input_estimate = await tokens.count_openai_request_async(body)
        requested_out = self._requested_output(body, fmt, model)
        # Ceiling: every input token at the dearer of miss/write, plus the output cap.
        started_ms = self.ledger.now_ms()
        prices = model.prices_at(started_ms)  # a price window is chosen by the request's start
        input_cost = _cost(input_estimate, max(prices.miss, prices.write))
        ceiling = input_cost + _cost(requested_out, prices.out)
        useful = min(self.settings.min_output_tokens, requested_out)
        minimum = input_cost + _cost(useful, prices.out)
        reservation = asyncio.ensure_future(
            self.ledger.reserve(
                key.account_id,
                request_id,
                ceiling,
                key_id=key.key_id,
                min_micro=minimum,
                concurrency_limit=self.settings.key_concurrency_limit,
                key_hash=key_hash,
            )
        )
        try:
            # Shielded: a client leaving right now must not strand a hold that Redis already made.
            held = await asyncio.shield(reservation)
        except asyncio.CancelledError:
            self._in_background(self._release_when_made(reservation, key.account_id, request_id))
            raise
        except LE.UnknownKey:
            self.key_cache.drop(key_hash)  # revoked since it was cached: the reserve script said so
            raise E.Unauthorized(REVOKED) from None
        except LE.InsufficientFunds as err:
            raise E.InsufficientCredit(
                f"Not enough credit for this request: it needs at least {minimum} micro-units "
                f"(input plus {useful} output tokens) and {err.available_micro} are available. "
                "Top up on the dashboard or lower max_tokens.",
                headers={"x-should-retry": "false"},
            ) from None
        max_tokens = requested_out
        if held < ceiling and prices.out > 0:
            # Lower the output cap to what the balance affords rather than refuse.
            max_tokens = max(useful, min(requested_out, (held - input_cost) * 1_000_000 // prices.out))
        ex = Exchange(
            request_id=request_id,
            account_id=key.account_id,
            key_id=key.key_id,
            model=model,
            client_fmt=fmt,
            stream=bool(body.get("stream")),
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
            input_estimate=input_estimate,
            max_tokens=max_tokens,
            started_ms=started_ms,
            prices=prices,
        )
        self.live[request_id] = key.account_id
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
            # Settle off the response path: a non-streamed answer goes out now, and a keep-alive
            # connection's next request does not queue behind this one's Redis round trip. The task
            # is not tied to this handler, so a cancellation (client gone) cannot stop it; shutdown
            # waits for every pending settlement.
            self._in_background(self._settle(ex))

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _release_when_made(self, reservation: asyncio.Future[int], account_id: str, request_id: str) -> None:
        try:
            await reservation
        except Exception:
            return  # refused or failed: nothing is held
        try:
            await self.ledger.release(account_id, request_id, reason="client_disconnect")
        except Exception as exc:
            # The worker's stale sweep releases it after its deadline.
            log.warning("release failed request_id=%s error=%s", request_id, type(exc).__name__)

    # ----- upstream -------------------------------------------------------------------------------
    def _upstream_request(
        self, request: web.Request, ex: Exchange, body: dict[str, Any]
    ) -> tuple[str, dict[str, str], bytes]:
        model = ex.model
        provider = model.provider
        up_fmt = provider.format
        if ex.translated:
            ex.names = ToolNameMap()
            if up_fmt == "openai":
                out = anthropic_to_openai_request(
                    body, upstream_model=model.upstream_model, max_tokens=ex.max_tokens, names=ex.names
                )
            else:
                out = openai_to_anthropic_request(body, upstream_model=model.upstream_model, max_tokens=ex.max_tokens)
        else:
            out = dict(body)
            out["model"] = model.upstream_model
            if up_fmt == "openai":
                if "max_completion_tokens" in out:
                    out["max_completion_tokens"] = ex.max_tokens
                else:
                    out["max_tokens"] = ex.max_tokens
            else:
                out["max_tokens"] = ex.max_tokens
        if up_fmt == "openai" and ex.stream:
            out["stream"] = True
            out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if ex.stream else "application/json"}
        if up_fmt == "openai":
            api_key = self.internal_token if provider.internal else provider.api_key
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
        else:
            if provider.api_key:
                headers["x-api-key"] = provider.api_key
            headers["anthropic-version"] = request.headers.get("anthropic-version", "2023-06-01")
            beta = request.headers.get("anthropic-beta")
            if beta and ex.client_fmt == "anthropic":
                headers["anthropic-beta"] = beta
        url = provider.endpoint
        if provider.internal:
            # The demo upstream is this very server: call it on the socket the request came in on.
            host, port = request.transport.get_extra_info("sockname")[:2] if request.transport else ("127.0.0.1", 0)
            host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
            url = f"http://{host}:{port}/_demo/v1/chat/completions"
        return url, headers, orjson.dumps(out)

    async def _forward(self, request: web.Request, ex: Exchange, body: dict[str, Any]) -> web.StreamResponse:
        url, headers, payload = self._upstream_request(request, ex, body)
        provider = ex.model.provider
        if provider.api_key is None and not provider.internal:
            raise E.UpstreamError(
                f"Provider '{provider.name}' has no API key configured ({provider.api_key_env} is unset)."
            )
        t0 = time.perf_counter()
        try:
            up = await self.http.post(url, data=payload, headers=headers, timeout=self.timeout)
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
            err_body = orjson.loads(raw) if raw else {}
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ValueError):
            err_body = {}
        status = up.status
        # The upstream's own quota/balance problems are ours to fix, not the user's to top up.
        client_status = 502 if status in (401, 402, 403) else status
        if status == 402 or status == 401 or status == 403:
            err_body = {"error": {"message": "The upstream provider refused our credentials or quota.", "type": "server_error"}} if ex.client_fmt == "openai" else {
                "type": "error", "error": {"type": "api_error", "message": "The upstream provider refused our credentials or quota."}}
        elif ex.translated:
            if ex.client_fmt == "openai":
                err_body = anthropic_error_to_openai(status, err_body)
            else:
                err_body = openai_error_to_anthropic(status, err_body)
        headers = {"x-request-id": ex.request_id}
        if "retry-after" in up.headers:
            headers["retry-after"] = up.headers["retry-after"]
        return web.Response(status=client_status, body=orjson.dumps(err_body), content_type="application/json", headers=headers)

    def _echo_model(self, data: bytes, ex: Exchange) -> bytes:
        """Put the client's model name back where the upstream wrote its own, without re-encoding."""
        up_name = ex.model.upstream_model
        client_name = ex.model.name
        if up_name == client_name:
            return data
        tight, tight_to, spaced, spaced_to = _model_patterns(up_name, client_name)
        return data.replace(tight, tight_to).replace(spaced, spaced_to)

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
        if ex.translated:
            if ex.client_fmt == "openai":
                out = anthropic_to_openai_response(obj, client_model=ex.model.name, names=ex.names)
            else:
                out = openai_to_anthropic_response(obj, client_model=ex.model.name, names=ex.names)
            raw = orjson.dumps(out)
        else:
            raw = self._echo_model(raw, ex)
        return web.Response(body=raw, content_type="application/json", headers={"x-request-id": ex.request_id})

    async def _relay_stream(self, request: web.Request, ex: Exchange, up: aiohttp.ClientResponse) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, "x-request-id": ex.request_id})
        await resp.prepare(request)
        self.metrics.active_streams += 1
        try:
            if ex.translated:
                await self._stream_translated(ex, up, resp)
            else:
                await self._stream_passthrough(ex, up, resp)
        finally:
            self.metrics.active_streams -= 1
        return resp

    async def _stream_passthrough(self, ex: Exchange, up: aiohttp.ClientResponse, resp: web.StreamResponse) -> None:
        parser = SSEParser()
        tracker = ex.tracker
        openai = ex.client_fmt == "openai"
        # An OpenAI client that did not ask for usage must not get the extra usage-only chunk we asked
        # for: then events are re-framed one by one (still without re-encoding their JSON).
        filtering = openai and not ex.include_usage
        saw_end = False
        try:
            async for chunk in up.content.iter_any():
                events = parser.feed(chunk)
                if not filtering:
                    await resp.write(self._echo_model(chunk, ex))
                    ex.produced = True
                for ev in events:
                    if ev.data == DONE:
                        saw_end = True
                        if filtering:
                            await resp.write(b"data: [DONE]\n\n")
                        continue
                    try:
                        obj = orjson.loads(ev.data)
                    except orjson.JSONDecodeError:
                        continue
                    if openai:
                        tracker.observe_chunk(obj)
                        if "error" in obj:
                            ex.status = "upstream_error"
                    else:
                        tracker.observe_event(ev.event or obj.get("type", ""), obj)
                        if ev.event == "message_stop":
                            saw_end = True
                        elif ev.event == "error":
                            ex.status = "upstream_error"
                    if filtering:
                        if not obj.get("choices") and "usage" in obj and "error" not in obj:
                            continue  # the usage chunk the client did not ask for
                        await resp.write(self._echo_model(b"data: " + ev.data + b"\n\n", ex))
                        ex.produced = True
        except TimeoutError:
            ex.status = "upstream_timeout"
            await self._stream_error(ex, resp, "timeout_error", "The upstream model service stopped sending; the answer is incomplete.")
            return
        except aiohttp.ClientError:
            ex.status = "upstream_error"
            await self._stream_error(ex, resp, "api_error", "The upstream connection broke; the answer is incomplete.")
            return
        if not saw_end and ex.status == "ok":
            ex.status = "upstream_error"
            await self._stream_error(ex, resp, "api_error", "The upstream ended the stream early; the answer is incomplete.")
            return
        await resp.write_eof()

    async def _stream_translated(self, ex: Exchange, up: aiohttp.ClientResponse, resp: web.StreamResponse) -> None:
        parser = SSEParser()
        tracker = ex.tracker
        if ex.client_fmt == "anthropic":
            to_anthropic = OpenAIToAnthropicStream(
                client_model=ex.model.name, message_id="msg_" + ex.request_id[4:], input_tokens=ex.input_estimate, names=ex.names
            )
            translator: OpenAIToAnthropicStream | AnthropicToOpenAIStream = to_anthropic
            await resp.write(to_anthropic.start())
        else:
            translator = AnthropicToOpenAIStream(
                client_model=ex.model.name, completion_id="chatcmpl-" + ex.request_id[4:], include_usage=ex.include_usage, names=ex.names
            )
        ex.produced = True
        try:
            async for chunk in up.content.iter_any():
                out = b""
                for ev in parser.feed(chunk):
                    if ev.data == DONE:
                        continue
                    try:
                        obj = orjson.loads(ev.data)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(translator, OpenAIToAnthropicStream):
                        tracker.observe_chunk(obj)
                        if "error" in obj:
                            ex.status = "upstream_error"
                            err = obj.get("error") or {}
                            out += translator.error("api_error", str(err.get("message", "upstream error"))[:300])
                            continue
                        out += translator.feed(obj)
                    else:
                        etype = ev.event or obj.get("type", "")
                        tracker.observe_event(etype, obj)
                        if etype == "error":
                            ex.status = "upstream_error"
                            err = obj.get("error") or {}
                            out += translator.error(str(err.get("type", "api_error")), str(err.get("message", "upstream error"))[:300])
                            continue
                        out += translator.feed(etype, obj)
                if out:
                    await resp.write(out)
                elif chunk.startswith(b":"):
                    # The upstream's keep-alive while it thinks: pass one on (a comment is valid SSE in
                    # either format) so the client's idle timer does not give up on a live answer.
                    await resp.write(b": keep-alive\n\n")
                if translator.done:
                    break
        except TimeoutError:
            ex.status = "upstream_timeout"
            await resp.write(translator.error("timeout_error", "The upstream model service stopped sending; the answer is incomplete."))
            await resp.write(translator.finish() if isinstance(translator, AnthropicToOpenAIStream) else b"")
            return
        except aiohttp.ClientError:
            ex.status = "upstream_error"
            await resp.write(translator.error("api_error", "The upstream connection broke; the answer is incomplete."))
            await resp.write(translator.finish() if isinstance(translator, AnthropicToOpenAIStream) else b"")
            return
        tail = translator.finish()
        if tail:
            await resp.write(tail)
        if ex.status == "ok" and tracker.finish_reason is None and tracker.stop_reason is None:
            ex.status = "upstream_error"
        await resp.write_eof()

    async def _stream_error(self, ex: Exchange, resp: web.StreamResponse, err_type: str, message: str) -> None:
        if ex.client_fmt == "anthropic":
            frame = format_json_event({"type": "error", "error": {"type": err_type, "message": message}}, "error")
        else:
            frame = format_json_event({"error": {"message": message, "type": err_type, "code": ex.status}})
        try:
            await resp.write(frame)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass

    # ----- settlement -----------------------------------------------------------------------------
    async def _settle(self, ex: Exchange) -> None:
        model = ex.model
        try:
            if ex.status == "bad_request":
                await self.ledger.release(ex.account_id, ex.request_id, reason="bad_request")
                return
            # Nothing produced and nothing reported (the upstream refused, or the client left first):
            # an all-zero usage, so the row records the request and the hold goes back in full.
            usage, estimated = Usage(), False
            if ex.produced or ex.tracker.usage is not None:
                usage, estimated = await ex.tracker.result_async(ex.input_estimate)
            p = ex.prices
            charge = charge_micro(usage, hit=p.hit, miss=p.miss, out=p.out, write=p.write)
            hit, miss, write, out = usage.input_cache_hit, usage.metered_miss, usage.cache_write, usage.output
            finished = self.ledger.now_ms()
            metering = {
                "request_id": ex.request_id,
                "key_id": ex.key_id,
                "model": model.name,
                "provider": model.provider.name,
                "upstream_model": model.upstream_model,
                "input_cache_hit_tokens": hit,
                "input_cache_miss_tokens": miss,  # cache writes included (SPEC 7)
                "cache_write_tokens": write,
                "output_tokens": out,
                "status": ex.status,
                "estimated": estimated,
                "started_at": iso_ms(ex.started_ms),
                "finished_at": iso_ms(finished),
                "latency_ms": finished - ex.started_ms,
            }
            settlement = await self._settle_with_retry(ex, charge, metering)
            self.metrics.usage(model.name, hit, miss, out, settlement.charged_micro)
            log.info(
                "settled request_id=%s model=%s status=%s in=%d/%d out=%d charge_micro=%d shortfall_micro=%d",
                ex.request_id, model.name, ex.status, hit, miss, out, settlement.charged_micro, settlement.shortfall_micro,
            )
        except Exception as exc:
            # The reservation stays; the worker releases it after its deadline. Ids only in the log.
            log.error("settle failed request_id=%s error=%s", ex.request_id, type(exc).__name__)

    async def _settle_with_retry(self, ex: Exchange, charge: int, metering: dict[str, Any]) -> Settlement:
        """Settle is idempotent on the request id, so a Redis blip is retried (capped backoff, jitter)
        well inside the reservation's deadline instead of leaving the answer unbilled."""
        delay = 0.05
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                return await self.ledger.settle(ex.account_id, ex.request_id, charge, metering=metering)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt == SETTLE_ATTEMPTS - 1:
                    raise
                log.warning("settle retry request_id=%s attempt=%d", ex.request_id, attempt + 1)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")
