"""`python -m gateway payments COMMAND`: the operators' Omise commands (refund, sync-omise).

They live beside the payments code, not in `python -m ledger`: the ledger knows no HTTP and no Omise.
They run over the ledger CLI's context (same settings, exit codes, `--json` and audit log).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from ledger.cli import EXIT_OK, BadUsage, CliParser, Ctx, Refused, id_arg, run_cli
from ledger.money import parse_amount

from ..errors import GatewayError
from ..omise_api import OMISE_API_BASE, OmiseClient
from .service import Payments
from .sync import sync_pending

__all__ = ["build_parser", "main"]


@contextlib.asynccontextmanager
async def _payments(ctx: Ctx) -> AsyncIterator[Payments]:
    """The Payments service over the ledger, talking to Omise with OMISE_SECRET_KEY."""
    secret = ctx.environ.get("OMISE_SECRET_KEY") or ""
    if not secret:
        raise Refused("OMISE_SECRET_KEY is not set")
    ledger = await ctx.ledger()
    async with aiohttp.ClientSession() as http:
        omise = OmiseClient(
            secret, http, api_base=(ctx.environ.get("OMISE_API_BASE") or OMISE_API_BASE).rstrip("/")
        )
        yield Payments(
            ledger,
            omise,
            currency=ctx.config.currency,
            public_base_url=ctx.environ.get("PUBLIC_BASE_URL") or "",
        )


async def cmd_sync_omise(ctx: Ctx, a: argparse.Namespace) -> int:
    async with _payments(ctx) as payments:
        report = await sync_pending(payments, older_than_s=a.older_than, store=ctx.store())
        out = report.as_json()
        ctx.audit(
            "omise.sync", "topups", {k: v for k, v in out.items() if k != "topups"}, payments.ledger.now_ms()
        )
    ctx.emit(out)
    return EXIT_OK


async def cmd_refund(ctx: Ctx, a: argparse.Namespace) -> int:
    amount = None
    if a.amount is not None:
        try:
            amount = parse_amount(a.amount)
        except ValueError as exc:
            raise BadUsage(f"--amount: {exc}") from None
    id_arg("bkt", a.bucket_id)
    async with _payments(ctx) as payments:
        account = await payments.ledger.bucket_account(a.bucket_id) or ""
        try:
            outcome = await payments.refund_bucket(None, a.bucket_id, amount_micro=amount)
        except GatewayError as exc:
            raise Refused(exc.message) from None
        ctx.audit(
            "refund", account, {**outcome.as_json(), "bucket_id": a.bucket_id}, payments.ledger.now_ms()
        )
    ctx.emit(outcome.as_json())
    if outcome.status == "reverted":
        raise Refused(f"Omise refused the refund ({outcome.failure_code}): {outcome.failure_message}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m gateway payments", description="Omise top-ups and refunds (operators).")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CliParser)

    def cmd(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sp.set_defaults(fn=fn)
        return sp

    cmd("sync-omise", cmd_sync_omise, "ask Omise about every pending top-up; credit or fail it").add_argument(
        "--older-than", type=int, default=0, metavar="SECONDS", help="only top-ups pending this long"
    )
    rf = cmd("refund", cmd_refund, "refund a top-up bucket's unused credit through Omise")
    rf.add_argument("bucket_id")
    rf.add_argument("--amount", help="currency units (default: all unused credit, in whole satang)")
    return p


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    return run_cli(build_parser(), "payments", argv, environ)
