"""The one place errors become HTTP: in the format of the route they came from, never with internals.

OpenAI routes answer ``{"error": {message, type, param, code}}``; Anthropic routes
``{"type": "error", "error": {type, message}}``; everything else a small JSON error (HTML pages render
their own). A response already streaming is passed through untouched: after the first byte, errors
are SSE events written by the proxy.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ledger import errors as LE

from . import errors as E
from .appkeys import METRICS, REQUEST_ID, SETTINGS

__all__ = ["client_format", "error_middleware", "ledger_to_gateway", "render_error"]

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Randomness:
    """The system's randomness read 4,092 bytes (682 ids) at a time: an id's 6 bytes were a system call each.
    Only the event loop's thread asks; a forked child starts with none of its parent's bytes."""

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._at = b"", 0

    def hex6(self) -> str:
        at = self._at
        if at + 6 > len(self._pool):
            self._pool, at = os.urandom(4092), 0
        self._at = at + 6
        return self._pool[at : at + 6].hex()


_randomness = _Randomness()


def new_request_id() -> str:
    rand = _randomness.hex6()
    return f"req_{rand[:2]}{int(time.time() * 1000):013d}{rand[2:]}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-4:]))


def client_format(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "plain"


RESTORING = (
    "The ledger is being restored after a Redis failure; nothing was charged. Retry in a few minutes."
)


def ledger_to_gateway(err: LE.LedgerError) -> E.GatewayError:
    if isinstance(err, LE.LedgerLost):
        # Never a 401: the key is fine, the ledger is not (a 401 makes Claude Code ask for a new login).
        return E.ServiceUnavailable(RESTORING, headers={"retry-after": "60"})
    if isinstance(err, LE.InsufficientFunds):
        return E.InsufficientCredit(
            "Not enough credit for this request. Top up on the dashboard, then retry.",
            headers={"x-should-retry": "false"},
            fields={"available_micro": err.available_micro},
        )
    if isinstance(err, LE.ConcurrencyLimit):
        return E.TooManyRequests("Too many concurrent requests for this API key; retry when one finishes.")
    if isinstance(err, LE.AccountClosed):
        return E.Unauthorized("This account is closed.")
    if isinstance(err, LE.UnknownAccount | LE.UnknownKey | LE.UnknownBucket):
        return E.NotFound(err.message)
    if isinstance(err, LE.KeyLimit | LE.NotRefundable):
        return E.Conflict(err.message)
    return E.GatewayError("ledger refused the operation")


def render_error(fmt: str, err: E.GatewayError, request_id: str) -> web.Response:
    if fmt == "anthropic":
        body: dict[str, object] = {
            "type": "error",
            "error": {"type": err.anthropic_type, "message": err.message, **err.fields},
            "request_id": request_id,
        }
    elif fmt == "openai":
        body = {
            "error": {
                "message": err.message,
                "type": err.openai_type,
                "param": err.param,
                "code": err.code,
                **err.fields,
            }
        }
    else:
        body = {"error": {"type": err.anthropic_type, "code": err.code, "message": err.message, **err.fields}}
    headers = {"x-request-id": request_id, **err.headers}
    if err.status == 402:
        headers.setdefault("x-should-retry", "false")
    return web.Response(
        status=err.status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPRequestEntityTooLarge:
        response = render_error(
            client_format(request.path),
            E.PayloadTooLarge(f"Request body exceeds the {request.app[SETTINGS].max_body_bytes} byte limit."),
            request_id,
        )
    except web.HTTPException as exc:
        if exc.status in (404, 405) and request.path.startswith("/v1/"):
            err = E.NotFound(f"No route {request.method} {request.path}.") if exc.status == 404 else E.BadRequest(
                f"Method {request.method} not allowed on {request.path}."
            )
            if exc.status == 405:
                err.status = 405
            response = render_error(client_format(request.path), err, request_id)
        else:
            exc.headers["x-request-id"] = request_id
            metrics.request(route, exc.status)
            raise
    except E.GatewayError as err:
        response = render_error(client_format(request.path), err, request_id)
    except LE.LedgerError as err:
        response = render_error(client_format(request.path), ledger_to_gateway(err), request_id)
    except (RedisConnectionError, RedisTimeoutError):
        log.warning("ledger unavailable request_id=%s", request_id)
        response = render_error(
            client_format(request.path),
            E.ServiceUnavailable("The ledger is briefly unavailable; nothing was charged. Retry shortly."),
            request_id,
        )
    except (HttpProcessingError, RequestPayloadError) as exc:
        # The body's framing or Content-Encoding broke while a handler read it (a gzip header on a body
        # that is not gzip, bad chunked encoding): the client's fault. The message quotes the bytes.
        log.info("unreadable request body error=%s request_id=%s", type(exc).__name__, request_id)
        response = render_error(
            client_format(request.path),
            E.BadRequest("The request body could not be read: its framing or Content-Encoding is broken."),
            request_id,
        )
        # The rest of the body is unreadable too: say the connection ends here, or the client would
        # send its next request on a connection aiohttp is about to drop.
        response.force_close()
    except Exception as exc:
        # SECURITY: an exception's message may quote request data; log its type and where it was
        # raised, never its message or locals.
        log.error("unhandled %s at %s request_id=%s", type(exc).__name__, _where(exc), request_id)
        response = render_error(
            client_format(request.path), E.GatewayError("Internal error; quote the request id."), request_id
        )
    if not response.prepared:
        response.headers.setdefault("x-request-id", request_id)
        if "Content-Encoding" in request.headers and not request.content.is_eof():
            # aiohttp drains an unread body after the response and drops the connection if it cannot
            # be decoded: announce the close, or a client reuses the connection and loses a request.
            response.force_close()
    metrics.request(route, response.status)
    return response
