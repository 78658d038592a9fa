"""Anthropic Messages clients (`POST /v1/messages`): Claude Code, the Anthropic SDK."""

from __future__ import annotations

from typing import Any

from ..estimate import estimate_body
from ..translate import (
    OpenAIToAnthropicStream,
    anthropic_to_openai_request,
    openai_error_to_anthropic,
    openai_to_anthropic_response,
)
from ..translate.thinking import fit_thinking_budget
from .base import (
    ChunkFed,
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

__all__ = ["ANTHROPIC", "anthropic_intake"]


def anthropic_intake(body: dict[str, Any]) -> Intake:
    model_name, stream = common_fields(body)
    need_messages(body)
    asked = positive_int(body, "max_tokens", required=True)
    return Intake(model_name, stream, False, asked)


def _anthropic_passthrough(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    req = dict(body)
    req["model"] = out.model.upstream_model
    asked = req.get("max_tokens")
    req["max_tokens"] = out.max_tokens
    if isinstance(asked, int) and out.max_tokens < asked:
        # A valid request must not become invalid because we lowered its cap.
        fit_thinking_budget(req, asked, out.max_tokens, out.betas)
    metadata = req.get("metadata")
    if isinstance(metadata, dict) and "user_id" in metadata:
        req["metadata"] = {**metadata, "user_id": out.user_tag}
    return req


def _anthropic_to_openai(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    return anthropic_to_openai_request(
        body,
        upstream_model=out.model.upstream_model,
        max_tokens=out.max_tokens,
        names=out.names,
        capabilities=out.capabilities,
    )


def _to_anthropic_stream(ctx: ReplyContext) -> StreamTranslator:
    """Chat Completions chunks from an OpenAI-format upstream -> Anthropic Messages events."""
    return ChunkFed(
        OpenAIToAnthropicStream(
            client_model=ctx.client_model,
            message_id="msg_" + ctx.request_id[4:],
            input_tokens=ctx.input_estimate,
            names=ctx.names,
        )
    )


ANTHROPIC = ClientFormat(
    name="anthropic",
    error_format="anthropic",
    anthropic_headers=True,
    intake=anthropic_intake,
    estimate_input=lambda body: estimate_body(body, "anthropic"),
    big_members=frozenset(("messages", "system", "tools")),
    count_format="anthropic",
    routes={
        "anthropic": Route(request=_anthropic_passthrough),
        "openai": Route(
            request=_anthropic_to_openai,
            response=lambda obj, ctx: openai_to_anthropic_response(obj, client_model=ctx.client_model, names=ctx.names),
            stream=_to_anthropic_stream,
            error=openai_error_to_anthropic,
        ),
    },
)
