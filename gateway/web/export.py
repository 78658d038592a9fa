"""The exports: the account's whole metering or credit history as CSV or JSON, streamed while it is read."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import time
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from ledger.store import HISTORY_COLUMNS, METERING_COLUMNS, UNAVAILABLE

from .. import errors as E
from ..appkeys import STORE

__all__ = ["CHUNK_ROWS", "export_history", "export_usage"]

CHUNK_ROWS = 500


def _csv_lines(rows: list[dict[str, Any]], header: bool, columns: tuple[str, ...]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow(
            orjson.dumps(row[c]).decode() if c == "draws" else ("" if row[c] is None else row[c])
            for c in columns
        )
    return buf.getvalue().encode()


def _next_chunk(rows: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(itertools.islice(rows, CHUNK_ROWS))


async def export_usage(request: web.Request, account_id: str, fmt: str) -> web.StreamResponse:
    """GET /api/usage/export: rows leave as they are read (oldest first), never all in memory."""
    rows = request.app[STORE].iter_usage(account_id, chunk=CHUNK_ROWS)
    return await _stream(request, rows, METERING_COLUMNS, f"usage-{account_id}", fmt)


async def export_history(request: web.Request, account_id: str, fmt: str) -> web.StreamResponse:
    """GET /api/history/export: every money event, oldest first, streamed like the usage export."""
    rows = request.app[STORE].iter_history(account_id, chunk=CHUNK_ROWS)
    return await _stream(request, rows, HISTORY_COLUMNS, f"credit-history-{account_id}", fmt)


async def _stream(
    request: web.Request, rows: Iterator[dict[str, Any]], columns: tuple[str, ...], name: str, fmt: str
) -> web.StreamResponse:
    try:
        first = await asyncio.to_thread(_next_chunk, rows)
    except UNAVAILABLE:
        raise E.ServiceUnavailable("Usage history is not available right now; try again shortly.") from None
    stamp = time.strftime("%Y%m%d", time.gmtime())
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/json",
            "Content-Disposition": f'attachment; filename="{name}-{stamp}.{fmt}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    await resp.prepare(request)
    chunk, n = first, 0
    if fmt == "json":
        await resp.write(b"[")
    while True:
        if fmt == "csv":
            await resp.write(_csv_lines(chunk, header=n == 0, columns=columns))
        elif chunk:
            sep = b"," if n else b""
            await resp.write(sep + b"\n" + b",\n".join(orjson.dumps(r) for r in chunk))
        n += len(chunk)
        if len(chunk) < CHUNK_ROWS:
            break
        # A failure past this point cannot change the status any more: the download ends short.
        chunk = await asyncio.to_thread(_next_chunk, rows)
    if fmt == "json":
        await resp.write(b"\n]\n")
    await resp.write_eof()
    return resp
