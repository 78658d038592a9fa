"""OpenAI Responses clients (`POST /v1/responses`, what Codex CLI speaks) and Codex's remote compaction
(`POST /v1/responses/compact`). Stateless: the client resends the conversation every turn.

A Responses request is translated to Chat Completions first (keeping a map of tool identities:
custom and namespaced tools), and from there to the upstream's format; the answer comes back as
Responses events or a response object, whatever the upstream spoke.
"""

from __future__ import annotations

from typing import Any

from ..clientbody import ClientBody
from ..estimate import PromptEstimate, estimate_prompt
from ..translate import (
    AnthropicToResponsesStream,
    ChatToResponsesStream,
    ResponsesToolMap,
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    anthropic_to_responses_response,
    chat_to_responses_response,
    openai_to_anthropic_request,
    responses_to_chat_request,
)
from .base import (
    ChunkFed,
    ClientFormat,
    Intake,
    Outgoing,
    ReplyContext,
    Route,
    StreamTranslator,
    common_fields,
    positive_int,
)

__all__ = ["RESPONSES", "RESPONSES_COMPACT", "responses_intake"]


def responses_intake(body: dict[str, Any]) -> Intake:
    model_name, stream = common_fields(body)
    asked = positive_int(body, "max_output_tokens")
    return Intake(model_name, stream, True, asked)


def _estimate(client_body: ClientBody) -> PromptEstimate:
    # Always parsed whole (no big members to leave unread: every route translates). Estimated on
    # the Chat form; a request the gateway cannot serve (stateful fields, malformed
    # items) is refused here, a 400 before anything is held.
    chat, _ = responses_to_chat_request(client_body.head, upstream_model="", max_tokens=1)
    return estimate_prompt(chat, "openai")


def _chat(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    chat, tools = responses_to_chat_request(
        body, upstream_model=out.model.upstream_model, max_tokens=out.max_tokens, capabilities=out.capabilities
    )
    out.state = tools
    return chat


def _anthropic(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    return openai_to_anthropic_request(_chat(body, out), upstream_model=out.model.upstream_model, max_tokens=out.max_tokens)


def _response_id(ctx: ReplyContext) -> str:
    return "resp_" + ctx.request_id[4:]


def _tools(ctx: ReplyContext) -> ResponsesToolMap:
    return ctx.state if isinstance(ctx.state, ResponsesToolMap) else ResponsesToolMap()


def _stream_kwargs(ctx: ReplyContext) -> dict[str, Any]:
    return {
        "response_id": _response_id(ctx),
        "client_model": ctx.client_model,
        "tools": _tools(ctx),
        "request": ctx.body,
        "input_tokens": ctx.input_estimate,
    }


def _from_chat(ctx: ReplyContext) -> StreamTranslator:
    return ChunkFed(ChatToResponsesStream(**_stream_kwargs(ctx)))


def _from_anthropic(ctx: ReplyContext) -> StreamTranslator:
    return AnthropicToResponsesStream(**_stream_kwargs(ctx))


def _body_kwargs(ctx: ReplyContext) -> dict[str, Any]:
    return {"response_id": _response_id(ctx), "client_model": ctx.client_model, "tools": _tools(ctx), "request": ctx.body}


RESPONSES = ClientFormat(
    name="responses",
    error_format="openai",
    intake=responses_intake,
    estimate_input=_estimate,
    routes={
        "openai": Route(
            request=_chat,
            response=lambda obj, ctx: chat_to_responses_response(obj, **_body_kwargs(ctx)),
            stream=_from_chat,
            # An OpenAI-format upstream's error body is already the OpenAI error shape: it passes.
        ),
        "anthropic": Route(
            request=_anthropic,
            response=lambda obj, ctx: anthropic_to_responses_response(obj, **_body_kwargs(ctx)),
            stream=_from_anthropic,
            error=anthropic_error_to_openai,
        ),
    },
)


# ----- remote compaction ---------------------------------------------------------------------------
# Codex replaces its history with the `output` of this call. The upstream is asked for a summary that
# a fresh session can continue from; it comes back as one user message (no opaque blob to invent).
COMPACT_INSTRUCTION = (
    "Summarize the conversation above so that it can be continued from the summary alone: the task, "
    "decisions made, files and commands involved, what was done and what remains. Reply with the "
    "summary only."
)
SUMMARY_PREFIX = "Summary of the conversation so far (compacted by the gateway):\n\n"


def _compact_intake(body: dict[str, Any]) -> Intake:
    intake = responses_intake({**body, "stream": False})
    intake.stream = False
    return intake


def _compact_chat(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    chat = _chat({**body, "stream": False}, out)
    for field in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
        chat.pop(field, None)
    chat["messages"] = [*chat["messages"], {"role": "user", "content": COMPACT_INSTRUCTION}]
    return chat


def _compact_anthropic(body: dict[str, Any], out: Outgoing) -> dict[str, Any]:
    return openai_to_anthropic_request(
        _compact_chat(body, out), upstream_model=out.model.upstream_model, max_tokens=out.max_tokens
    )


def _compacted(chat_response: dict[str, Any]) -> dict[str, Any]:
    choices = chat_response.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    summary = content if isinstance(content, str) else ""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": SUMMARY_PREFIX + summary}]}
    return {"object": "response.compaction", "output": [item]}


RESPONSES_COMPACT = ClientFormat(
    name="responses_compact",
    error_format="openai",
    intake=_compact_intake,
    estimate_input=_estimate,
    routes={
        "openai": Route(request=_compact_chat, response=lambda obj, ctx: _compacted(obj), stream=_from_chat),
        "anthropic": Route(
            request=_compact_anthropic,
            response=lambda obj, ctx: _compacted(
                anthropic_to_openai_response(obj, client_model=ctx.client_model, names=ctx.names)
            ),
            stream=_from_anthropic,
            error=anthropic_error_to_openai,
        ),
    },
)
