"""OpenAI Chat Completions clients (`POST /v1/chat/completions`)."""

from __future__ import annotations

from typing import Any

from .. import errors as E
from ..estimate import estimate_body
from ..translate import (
    AnthropicToOpenAIStream,
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)
from .base import (
    ClientFormat,
    Intake,
    Outgoing,
    ReplyContext,
    Route,
    StreamTranslator,
    common_fields,
    need_messages,
    positive_int,
)

__all__ = ["OPENAI", "openai_intake"]


def openai_intake(body: dict[str, Any]) -> Intake:
    model_name, stream = common_fields(body)
    need_messages(body)
    asked = positive_int(body, "max_completion_tokens") or positive_int(body, "max_tokens")
    if body.get("n") not in (None, 1):
        raise E.BadRequest("Only n=1 is supported.", param="n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise E.BadRequest("'stream_options' must be an object.", param="stream_options")
    return Intake(model_name, stream, bool((options or {}).get("include_usage")), asked)


def _openai_passthrough(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    req = dict(body)
    req["model"] = out.model.upstream_model
    req["max_completion_tokens" if "max_completion_tokens" in req else "max_tokens"] = out.max_tokens
    return req


def _openai_to_anthropic(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    return openai_to_anthropic_request(body, upstream_model=out.model.upstream_model, max_tokens=out.max_tokens)


def _to_openai_stream(ctx: ReplyContext) -> StreamTranslator:
    """Anthropic upstream events -> Chat Completions chunks."""
    return AnthropicToOpenAIStream(
        client_model=ctx.client_model,
        completion_id="chatcmpl-" + ctx.request_id[4:],
        include_usage=ctx.include_usage,
        names=ctx.names,
    )


OPENAI = ClientFormat(
    name="openai",
    error_format="openai",
    intake=openai_intake,
    estimate_input=lambda body: estimate_body(body, "openai"),
    big_members=frozenset(("messages", "tools", "functions")),
    count_format="openai",
    routes={
        "openai": Route(request=_openai_passthrough),
        "anthropic": Route(
            request=_openai_to_anthropic,
            response=lambda obj, ctx: anthropic_to_openai_response(obj, client_model=ctx.client_model, names=ctx.names),
            stream=_to_openai_stream,
            error=anthropic_error_to_openai,
        ),
    },
)
