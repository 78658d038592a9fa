"""The HTTP server around the app: aiohttp's own logging and its parser-level errors, kept content-free.

aiohttp answers a request it cannot parse (a control character in a header, a body longer than its
Content-Length, broken chunked framing, an oversized header) before any of our code runs: its
``handle_error`` logs the parser's exception, whose text quotes the offending bytes (an API key, a
prompt), and sends that text back. Here it answers a fixed 400 with an ``x-request-id`` and logs the
exception's type only; and every record of aiohttp's own loggers, whatever the level, loses its
arguments, exception and stack text (ADR-0005).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from . import errors as E
from .middlewares import new_request_id, render_error

__all__ = ["AIOHTTP_LOGGERS", "GatewayRunner", "quiet_aiohttp_loggers"]

log = logging.getLogger("gateway.http")

# Every logger aiohttp has (aiohttp/log.py); a filter applies only to the logger it is attached to.
AIOHTTP_LOGGERS = (
    "aiohttp",
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)


class _ContentFree(logging.Filter):
    """Keeps a record's level, logger and message template; drops what could quote a request: the
    arguments, the exception (its type name is kept) and the stack. The access logger formats its
    line before logging (request line, headers), so its text goes too."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.access":
            record.msg = "access line withheld (it can quote the request)"
        elif not isinstance(record.msg, str):
            record.msg = type(record.msg).__name__
        if exc is not None:
            record.msg = f"{record.msg} [{type(exc).__name__}]"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


_FILTER = _ContentFree()


def quiet_aiohttp_loggers() -> None:
    """Attach the content-free filter to every aiohttp logger (idempotent)."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class _RequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        request_id = new_request_id()
        # Type and id only: the exception's text and the parser's message quote the request bytes.
        log.warning(
            "malformed request refused status=%d error=%s request_id=%s",
            status,
            type(exc).__name__ if exc is not None else "-",
            request_id,
        )
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        err = (
            E.BadRequest("Malformed HTTP request; nothing was processed.")
            if status < 500
            else E.GatewayError("Internal error; quote the request id.")
        )
        err.status = status
        resp = render_error("plain", err, request_id)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparsable requests with ``_RequestHandler``."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        quiet_aiohttp_loggers()
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same state, our protocol factory: aiohttp builds its Server with no hook for the handler class.
        server.__class__ = _Server
        return server
