"""The client formats the proxy serves, as a table: how each one's request is read, and for each
upstream format how it is sent and how the answer comes back.

The proxy looks a client format up here and never branches on a format itself. A client format is an
``Intake`` (validation, input count, output cap) plus one ``Route`` per upstream format. A route with
no translators is a passthrough: the request gets only its model and caps patched, and the answer's
bytes go back as they came (with the model name echoed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import errors as E
from . import tokens
from .models import Capabilities, Model
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
from .translate.thinking import fit_thinking_budget

__all__ = ["FORMATS", "ClientFormat", "Intake", "Outgoing", "Route", "StreamTranslator"]


@dataclass(slots=True)
class Intake:
    """What the proxy needs from a validated request, whatever its format."""

    model_name: str
    stream: bool
    include_usage: bool  # an OpenAI-style client asked for the usage chunk
    requested_output: int | None  # None: the model's cap


@dataclass(slots=True)
class Outgoing:
    """Everything a route needs to build the upstream request (no I/O, no money)."""

    model: Model
    max_tokens: int
    names: ToolNameMap
    user_tag: str  # stands for the client's own user id (Claude Code's device/session ids)
    betas: str  # the client's anthropic-beta header, "" when none

    @property
    def capabilities(self) -> Capabilities:
        return self.model.capabilities


class StreamTranslator(Protocol):
    @property
    def done(self) -> bool: ...

    def start(self) -> bytes: ...
    def feed(self, event: str, obj: dict[str, Any]) -> bytes: ...
    def error(self, err_type: str, message: str) -> bytes: ...
    def finish(self) -> bytes: ...


@dataclass(slots=True)
class StreamContext:
    client_model: str
    request_id: str
    input_estimate: int
    include_usage: bool
    names: ToolNameMap


@dataclass(frozen=True, slots=True)
class Route:
    """One (client format, upstream format) pair. ``response``/``stream``/``error`` left None mean the
    upstream already speaks the client's format: pass its bytes through."""

    request: Callable[[dict[str, Any], Outgoing], dict[str, Any]]
    response: Callable[[dict[str, Any], str, ToolNameMap], dict[str, Any]] | None = None
    stream: Callable[[StreamContext], StreamTranslator] | None = None
    error: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None

    @property
    def passthrough(self) -> bool:
        return self.stream is None


@dataclass(frozen=True, slots=True)
class ClientFormat:
    name: str
    intake: Callable[[dict[str, Any]], Intake]
    count_input: Callable[[dict[str, Any]], Awaitable[int]]
    routes: dict[str, Route]


# ----- shared checks -------------------------------------------------------------------------------
def _positive_int(body: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "is required and must be" if required else "must be"
        raise E.BadRequest(f"'{name}' {what} a positive integer.", param=name)
    return value


def _common(body: dict[str, Any]) -> tuple[str, bool]:
    model_name = body.get("model")
    if not isinstance(model_name, str) or not model_name:
        raise E.BadRequest("'model' is required and must be a string.", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise E.BadRequest("'stream' must be a boolean.", param="stream")
    return model_name, bool(body.get("stream"))


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise E.BadRequest("'messages' is required and must be a non-empty array.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise E.BadRequest(f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")


# ----- OpenAI Chat Completions ---------------------------------------------------------------------
def openai_intake(body: dict[str, Any]) -> Intake:
    model_name, stream = _common(body)
    _messages(body)
    asked = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
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


class _ToOpenAIStream:
    """Anthropic upstream events -> Chat Completions chunks."""

    def __init__(self, ctx: StreamContext) -> None:
        self._t = AnthropicToOpenAIStream(
            client_model=ctx.client_model,
            completion_id="chatcmpl-" + ctx.request_id[4:],
            include_usage=ctx.include_usage,
            names=ctx.names,
        )

    @property
    def done(self) -> bool:
        return self._t.done

    def start(self) -> bytes:
        return b""

    def feed(self, event: str, obj: dict[str, Any]) -> bytes:
        return self._t.feed(event, obj)

    def error(self, err_type: str, message: str) -> bytes:
        return self._t.error(err_type, message)

    def finish(self) -> bytes:
        return self._t.finish()


OPENAI = ClientFormat(
    name="openai",
    intake=openai_intake,
    count_input=tokens.count_openai_request_async,
    routes={
        "openai": Route(request=_openai_passthrough),
        "anthropic": Route(
            request=_openai_to_anthropic,
            response=lambda obj, model, names: anthropic_to_openai_response(obj, client_model=model, names=names),
            stream=_ToOpenAIStream,
            error=anthropic_error_to_openai,
        ),
    },
)


# ----- Anthropic Messages --------------------------------------------------------------------------
def anthropic_intake(body: dict[str, Any]) -> Intake:
    model_name, stream = _common(body)
    _messages(body)
    asked = _positive_int(body, "max_tokens", required=True)
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


class _ToAnthropicStream:
    """Chat Completions chunks from an OpenAI-format upstream -> Anthropic Messages events."""

    def __init__(self, ctx: StreamContext) -> None:
        self._t = OpenAIToAnthropicStream(
            client_model=ctx.client_model,
            message_id="msg_" + ctx.request_id[4:],
            input_tokens=ctx.input_estimate,
            names=ctx.names,
        )

    @property
    def done(self) -> bool:
        return self._t.done

    def start(self) -> bytes:
        return self._t.start()

    def feed(self, event: str, obj: dict[str, Any]) -> bytes:
        return self._t.feed(obj)

    def error(self, err_type: str, message: str) -> bytes:
        return self._t.error(err_type, message)

    def finish(self) -> bytes:
        return self._t.finish()


ANTHROPIC = ClientFormat(
    name="anthropic",
    intake=anthropic_intake,
    count_input=tokens.count_anthropic_request_async,
    routes={
        "anthropic": Route(request=_anthropic_passthrough),
        "openai": Route(
            request=_anthropic_to_openai,
            response=lambda obj, model, names: openai_to_anthropic_response(obj, client_model=model, names=names),
            stream=_ToAnthropicStream,
            error=openai_error_to_anthropic,
        ),
    },
)

FORMATS: dict[str, ClientFormat] = {f.name: f for f in (OPENAI, ANTHROPIC)}
