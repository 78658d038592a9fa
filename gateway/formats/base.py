"""What a client format is made of: an intake and one route per upstream format (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .. import errors as E
from ..clientbody import ClientBody
from ..estimate import PromptEstimate
from ..models import Capabilities, Model
from ..translate import ToolNameMap

__all__ = [
    "ChunkFed",
    "ClientFormat",
    "Intake",
    "Outgoing",
    "ReplyContext",
    "Route",
    "StreamTranslator",
    "common_fields",
    "need_messages",
    "positive_int",
]


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
    # What a route's request builder learns that its reply translators need (e.g. the Responses
    # tool map); the proxy hands it on in the ReplyContext.
    state: Any = None

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


class _ChunkTranslator(Protocol):
    @property
    def done(self) -> bool: ...

    def start(self) -> bytes: ...
    def feed(self, chunk: dict[str, Any]) -> bytes: ...
    def error(self, err_type: str, message: str) -> bytes: ...
    def finish(self) -> bytes: ...


class ChunkFed:
    """A translator of OpenAI-format upstream chunks (they carry no event name) in the proxy's shape."""

    __slots__ = ("_t",)

    def __init__(self, translator: _ChunkTranslator) -> None:
        self._t = translator

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


@dataclass(slots=True)
class ReplyContext:
    """What a route's reply translators get: ids, the client's model name, the request, no I/O."""

    client_model: str
    request_id: str
    input_estimate: int
    include_usage: bool
    names: ToolNameMap
    body: dict[str, Any]  # the client's request (translators echo its settings back)
    state: Any = None


@dataclass(frozen=True, slots=True)
class Route:
    """One (client format, upstream format) pair. ``response``/``stream``/``error`` left None mean the
    upstream already speaks the client's format: pass its bytes through. Then ``request`` must be a
    shallow edit of the body (top-level members set or removed, nested values never changed in
    place): the proxy forwards the client's own bytes when the edit only adds members."""

    request: Callable[[dict[str, Any], Outgoing], dict[str, Any]]
    response: Callable[[dict[str, Any], ReplyContext], dict[str, Any]] | None = None
    stream: Callable[[ReplyContext], StreamTranslator] | None = None
    error: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None

    @property
    def passthrough(self) -> bool:
        return self.response is None and self.stream is None


@dataclass(frozen=True, slots=True)
class ClientFormat:
    name: str
    error_format: str  # "openai" or "anthropic": how errors and in-stream failures are written
    intake: Callable[[dict[str, Any]], Intake]
    estimate_input: Callable[[ClientBody], PromptEstimate]  # cheap: a bound, exact on demand
    routes: dict[str, Route]
    # What a passthrough forwards without reading (gateway.clientbody): the big members, only
    # summarised for validation; empty: the body is always parsed whole.
    big_members: frozenset[str] = frozenset()
    count_format: str = "openai"  # the token-count rules of its bodies (gateway.tokens)
    # The client speaks Anthropic's protocol: its anthropic-beta header goes on to Anthropic upstreams.
    anthropic_headers: bool = False


# ----- shared checks -------------------------------------------------------------------------------
def positive_int(body: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "is required and must be" if required else "must be"
        raise E.BadRequest(f"'{name}' {what} a positive integer.", param=name)
    return value


def common_fields(body: dict[str, Any]) -> tuple[str, bool]:
    model_name = body.get("model")
    if not isinstance(model_name, str) or not model_name:
        raise E.BadRequest("'model' is required and must be a string.", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise E.BadRequest("'stream' must be a boolean.", param="stream")
    return model_name, bool(body.get("stream"))


def need_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise E.BadRequest("'messages' is required and must be a non-empty array.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise E.BadRequest(f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
