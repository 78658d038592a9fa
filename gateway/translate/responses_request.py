"""OpenAI Responses request -> OpenAI Chat Completions request (pure, no I/O).

For an Anthropic-format upstream the proxy composes this with ``openai_to_anthropic_request``.
Field-level decisions (mapped, dropped, refused) are tabled in docs/translation.md.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import BadRequest
from gateway.models import Capabilities
from gateway.translate.fields import cap_max_tokens, need_dict, need_list, number
from gateway.translate.responses_tools import ResponsesToolMap

__all__ = ["responses_to_chat_request"]

_STATELESS = "this gateway keeps no conversations; send the whole conversation with store: false"

# Items that record what OpenAI-hosted tools did (or OpenAI-only state): nothing to replay upstream.
_DROPPED_ITEMS = frozenset(
    {
        "web_search_call",
        "file_search_call",
        "code_interpreter_call",
        "image_generation_call",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "tool_search_call",
        "tool_search_output",
        "compaction",
        "compaction_summary",
        "context_compaction",
        "computer_call",
        "computer_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "local_shell_call_output",
    }
)

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _part_text(part: dict[str, Any]) -> str | None:
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        return str(part.get("text") or "")
    if kind == "refusal":
        return str(part.get("refusal") or "")
    return None


def _image_part(part: dict[str, Any], field: str) -> dict[str, Any]:
    url = part.get("image_url")
    if isinstance(url, dict):  # Chat-style {"url": ...} sent to the Responses API by some clients
        url = url.get("url")
    if not isinstance(url, str) or not url:
        if part.get("file_id"):
            raise BadRequest(
                f"{field}.file_id: uploaded files are not available here; send the image as a data URL",
                param=f"{field}.file_id",
            )
        raise BadRequest(f"{field}.image_url: required", param=f"{field}.image_url")
    image: dict[str, Any] = {"url": url}
    if part.get("detail") in ("low", "high", "auto"):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _content_parts(content: Any, field: str) -> list[dict[str, Any]]:
    """Message content -> Chat parts (text and image_url), empty text dropped."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(need_list(content, f"{field}.content")):
        part = need_dict(part, f"{field}.content[{j}]")
        text = _part_text(part)
        if text is not None:
            if text:
                parts.append({"type": "text", "text": text})
        elif part.get("type") == "input_image":
            parts.append(_image_part(part, f"{field}.content[{j}]"))
        elif part.get("type") == "encrypted_content":
            continue  # sealed for OpenAI's backend
        else:
            raise BadRequest(
                f"{field}.content[{j}].type: part type {part.get('type')!r} is not supported by this model",
                param=f"{field}.content[{j}].type",
            )
    return parts


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # Text-only content goes as a plain string: several OpenAI-compatible upstreams reject part lists.
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _reasoning_text(item: dict[str, Any]) -> str:
    texts: list[str] = []
    for key in ("summary", "content"):
        value = item.get(key)
        if isinstance(value, list):
            texts.extend(str(p.get("text") or "") for p in value if isinstance(p, dict))
    return "\n\n".join(t for t in texts if t)


class _Builder:
    """Accumulates Chat messages; keeps tool calls and their results adjacent, as Chat requires."""

    def __init__(self, tools: ResponsesToolMap) -> None:
        self.tools = tools
        self.messages: list[dict[str, Any]] = []
        self._reasoning: list[str] = []
        self._calls: dict[str, dict[str, Any]] | None = None  # call_id -> tool message, while open
        self._answered: set[str] = set()
        self._images: list[dict[str, Any]] = []  # images from tool outputs, for the next user turn
        self._tool_turn: dict[str, Any] = {}

    # -- assistant side -----------------------------------------------------------------------------

    def reasoning(self, text: str) -> None:
        if text:
            self._reasoning.append(text)

    def _take_reasoning(self) -> str | None:
        if not self._reasoning:
            return None
        text = "\n\n".join(self._reasoning)
        self._reasoning = []
        return text

    def assistant_text(self, text: str) -> None:
        if not text:
            return
        if self._calls is not None and all(m["content"] is None for m in self._calls.values()):
            # Text after the calls of the same turn (no result yet): still that one Chat turn.
            turn = self._tool_turn
            turn["content"] = f"{turn['content']}\n\n{text}" if turn.get("content") else text
            return
        self._close_calls()
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reasoning = self._take_reasoning()
        if reasoning:
            message["reasoning_content"] = reasoning
        self.messages.append(message)

    def tool_call(self, call_id: str, name: str, arguments: str) -> None:
        if self._calls is None:
            self._flush_images()
            last = self.messages[-1] if self.messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
                message = last  # "I will run the tests." followed by the call: one Chat turn
            else:
                message = {"role": "assistant", "content": None}
                self.messages.append(message)
            message["tool_calls"] = []
            reasoning = self._take_reasoning()
            if reasoning:
                message["reasoning_content"] = (message.get("reasoning_content") or "") + reasoning
            # DeepSeek's thinking mode rejects a tool-call turn without reasoning_content.
            message.setdefault("reasoning_content", "")
            self._calls = {}
            self._tool_turn = message
        self._tool_turn["tool_calls"].append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )
        self._calls[call_id] = {"role": "tool", "tool_call_id": call_id, "content": None}

    # -- results and user side ----------------------------------------------------------------------

    def tool_output(self, call_id: str, output: Any, field: str) -> None:
        text, images = self._output(output, field)
        if self._calls is not None and call_id in self._calls and self._calls[call_id]["content"] is None:
            self._calls[call_id]["content"] = text
            self._images.extend(images)
            if all(m["content"] is not None for m in self._calls.values()):
                self._close_calls()
            return
        # A result whose call is not the open turn (dropped, or answered after other messages):
        # say it in words rather than break Chat's call/result pairing.
        self._close_calls()
        self.user([{"type": "text", "text": f"Result of tool call {call_id}:\n{text}"}, *images])

    def _output(self, output: Any, field: str) -> tuple[str, list[dict[str, Any]]]:
        if output is None:
            return "", []
        if isinstance(output, str):
            return output, []
        parts = _content_parts(output, field)
        texts = [p["text"] for p in parts if p["type"] == "text"]
        return "\n".join(texts), [p for p in parts if p["type"] != "text"]

    def _close_calls(self) -> None:
        if self._calls is None:
            return
        for message in self._calls.values():
            if message["content"] is None:  # a call the client never answered (an aborted turn)
                message["content"] = "(no output was recorded for this call)"
            self.messages.append(message)
        self._answered.update(self._calls)
        self._calls = None
        self._flush_images()

    def _flush_images(self) -> None:
        if self._images:
            images, self._images = self._images, []
            self.messages.append({"role": "user", "content": images})

    def user(self, parts: list[dict[str, Any]]) -> None:
        self._close_calls()
        self._reasoning = []  # reasoning belongs to the assistant turn right after it
        if parts:
            self.messages.append({"role": "user", "content": _collapse(parts)})

    def system(self, text: str) -> None:
        self._close_calls()
        if text:
            self.messages.append({"role": "system", "content": text})

    def finish(self) -> list[dict[str, Any]]:
        self._close_calls()
        self._flush_images()
        return _fold_system_messages(self.messages)


def _fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leading system/developer messages (and ``instructions``) become one first system message.
    Later ones (Codex sends a developer message when settings change mid-session) are folded into
    the adjacent user turn as ``<system-reminder>`` text, as ``request_to_openai`` does: several
    OpenAI-format upstreams accept one system message, first. History only grows at the end, so
    the prompt prefix (and the upstream's cache of it) stays the same from turn to turn."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    out: list[dict[str, Any]] = []
    if lead:
        out.append({"role": "system", "content": "\n\n".join(m["content"] for m in messages[:lead])})
    pending: list[str] = []
    for msg in messages[lead:]:
        if msg["role"] == "system":
            text = f"<system-reminder>\n{msg['content']}\n</system-reminder>"
            if out and out[-1]["role"] == "user":
                out[-1] = _with_text(out[-1], text, first=False)
            else:
                pending.append(text)
            continue
        if pending and msg["role"] == "user":
            msg = _with_text(msg, "\n\n".join(pending), first=True)
            pending = []
        out.append(msg)
    if pending:
        out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


def _with_text(msg: dict[str, Any], text: str, *, first: bool) -> dict[str, Any]:
    content = msg["content"]
    if isinstance(content, str):
        return {**msg, "content": f"{text}\n\n{content}" if first else f"{content}\n\n{text}"}
    part = {"type": "text", "text": text}
    return {**msg, "content": [part, *content] if first else [*content, part]}


def _message_item(b: _Builder, item: dict[str, Any], field: str) -> None:
    role = item.get("role")
    parts = _content_parts(item.get("content"), field)
    if role in ("system", "developer"):
        if any(p["type"] != "text" for p in parts):
            raise BadRequest(
                f"{field}.content: only text is allowed in {role} messages", param=f"{field}.content"
            )
        b.system("\n\n".join(p["text"] for p in parts))
    elif role == "user":
        b.user(parts)
    elif role == "assistant":
        if any(p["type"] != "text" for p in parts):
            raise BadRequest(f"{field}.content: assistant messages take text only", param=f"{field}.content")
        b.assistant_text("".join(p["text"] for p in parts))
    else:
        raise BadRequest(f"{field}.role: unknown role {role!r}", param=f"{field}.role")


def _call_id(item: dict[str, Any], field: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"{field}.call_id: required", param=f"{field}.call_id")
    return call_id


def _name(item: dict[str, Any], field: str) -> tuple[str, str | None]:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{field}.name: required", param=f"{field}.name")
    namespace = item.get("namespace")
    return name, namespace if isinstance(namespace, str) and namespace else None


def _input_item(b: _Builder, item: dict[str, Any], field: str, extra_tools: list[Any]) -> None:
    kind = item.get("type", "message")  # EasyInputMessage has no type
    if kind == "message":
        _message_item(b, item, field)
    elif kind == "reasoning":
        b.reasoning(_reasoning_text(item))  # encrypted_content is OpenAI's; never forwarded
    elif kind == "function_call":
        name, namespace = _name(item, field)
        arguments = item.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        elif not isinstance(arguments, str):
            arguments = "{}"
        b.tool_call(_call_id(item, field), b.tools.upstream_name(name, namespace), arguments)
    elif kind == "custom_tool_call":
        name, namespace = _name(item, field)
        text = item.get("input")
        arguments = json.dumps({"input": text if isinstance(text, str) else ""}, ensure_ascii=False)
        b.tool_call(_call_id(item, field), b.tools.upstream_name(name, namespace, kind="custom"), arguments)
    elif kind == "local_shell_call":
        call_id = item.get("call_id") or item.get("id")
        if isinstance(call_id, str) and call_id:
            action = item.get("action") if isinstance(item.get("action"), dict) else {}
            b.tool_call(call_id, "local_shell", json.dumps(action, ensure_ascii=False))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        b.tool_output(_call_id(item, field), item.get("output"), f"{field}.output")
    elif kind == "agent_message":
        b.user(_content_parts(item.get("content"), field))
    elif kind == "additional_tools":
        extra_tools.extend(need_list(item.get("tools") or [], f"{field}.tools"))
    elif kind == "compaction_trigger":
        b.tools.compaction_requested = True
    elif kind == "item_reference":
        raise BadRequest(
            f"{field}: item_reference needs stored responses; {_STATELESS}", param=f"{field}.type"
        )
    elif kind in _DROPPED_ITEMS:
        return
    else:
        raise BadRequest(f"{field}.type: unknown input item type {kind!r}", param=f"{field}.type")


def _refuse_stateful(body: dict[str, Any]) -> None:
    if body.get("previous_response_id"):
        raise BadRequest(f"previous_response_id: {_STATELESS}", param="previous_response_id")
    if body.get("conversation"):
        raise BadRequest(f"conversation: {_STATELESS}", param="conversation")
    if body.get("store") is True:
        raise BadRequest(f"store: {_STATELESS}", param="store")
    if body.get("background") is True:
        raise BadRequest(
            "background: background responses are not supported; stream instead", param="background"
        )
    if body.get("prompt"):
        raise BadRequest("prompt: stored prompt templates are not available here", param="prompt")


def _structured_output(text: Any, capabilities: Capabilities) -> tuple[dict[str, Any] | None, str]:
    """``text.format`` -> (``response_format``, an instruction for the system message).

    An upstream with only JSON mode gets ``json_object`` plus the schema as an instruction (DeepSeek
    also wants the word "json" in the prompt); one with neither gets the instruction alone."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None, ""
    kind = fmt.get("type")
    if kind == "json_object":
        if capabilities.structured_output == "none":
            return None, "Respond with a single JSON object."
        return {"type": "json_object"}, ""
    if kind != "json_schema":
        raise BadRequest(f"text.format.type: unknown format {kind!r}", param="text.format.type")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise BadRequest("text.format.schema: required", param="text.format.schema")
    if capabilities.structured_output != "json_schema":
        note = "Respond with a single JSON object that matches this JSON schema:\n"
        note += json.dumps(schema, ensure_ascii=False)
        return ({"type": "json_object"} if capabilities.structured_output == "json_object" else None), note
    spec: dict[str, Any] = {"name": str(fmt.get("name") or "output"), "schema": schema}
    for key in ("strict", "description"):
        if fmt.get(key) is not None:
            spec[key] = fmt[key]
    return {"type": "json_schema", "json_schema": spec}, ""


_OPENAI_EFFORT = {
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def _reasoning(reasoning: Any, capabilities: Capabilities) -> dict[str, Any]:
    """``reasoning.effort`` -> the upstream's reasoning control (``gateway.models.Capabilities``):
    DeepSeek's thinking switch, or ``reasoning_effort``; nothing when the client set no effort."""
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if not isinstance(effort, str):
        return {}
    if capabilities.reasoning == "deepseek":
        if effort == "none":
            return {"thinking": {"type": "disabled"}}
        # DeepSeek takes the Responses effort ladder as is (it maps minimal..max onto its own).
        return {"thinking": {"type": "enabled"}, "reasoning_effort": effort}
    if capabilities.reasoning == "openai" and effort in _OPENAI_EFFORT:
        return {"reasoning_effort": _OPENAI_EFFORT[effort]}
    return {}


def responses_to_chat_request(
    body: dict[str, Any], *, upstream_model: str, max_tokens: int, capabilities: Capabilities | None = None
) -> tuple[dict[str, Any], ResponsesToolMap]:
    """A Responses request -> (Chat Completions request, the map that restores tool identities).

    ``max_tokens`` is the model's output cap (``max_output_tokens`` is clamped to it).
    ``capabilities`` (the model's, as for ``anthropic_to_openai_request``) decides what
    ``reasoning.effort`` and ``text.format`` become. ``prompt_cache_key`` is only on the returned map.
    """
    capabilities = capabilities or Capabilities()
    _refuse_stateful(body)
    response_format, schema_note = _structured_output(body.get("text"), capabilities)
    tools = ResponsesToolMap()
    key = body.get("prompt_cache_key")
    tools.prompt_cache_key = key if isinstance(key, str) and key else None

    declared = body.get("tools")
    chat_tools = tools.chat_tools(declared) if declared is not None else []

    b = _Builder(tools)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        b.system(instructions)
        if schema_note:
            b.system(schema_note)
    elif isinstance(instructions, list):  # a list of input messages is allowed here too
        for i, item in enumerate(instructions):
            _message_item(b, need_dict(item, f"instructions[{i}]"), f"instructions[{i}]")
    elif instructions is not None:
        raise BadRequest("instructions: must be a string", param="instructions")
    if schema_note and not isinstance(instructions, str):
        b.system(schema_note)

    extra_tools: list[Any] = []
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        b.user([{"type": "text", "text": raw_input}] if raw_input else [])
    elif raw_input is not None:
        for i, item in enumerate(need_list(raw_input, "input")):
            _input_item(b, need_dict(item, f"input[{i}]"), f"input[{i}]", extra_tools)
    messages = b.finish()
    if not any(m["role"] != "system" for m in messages):
        raise BadRequest("input: required (a string or at least one message)", param="input")
    if extra_tools:
        known = {t["function"]["name"] for t in chat_tools}
        chat_tools += [
            t
            for t in tools.chat_tools(extra_tools, "input.additional_tools")
            if t["function"]["name"] not in known
        ]

    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": messages,
        "max_tokens": cap_max_tokens(body.get("max_output_tokens"), max_tokens, "max_output_tokens"),
    }
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        value = number(body, key)
        if value is not None:
            out[key] = value
    if chat_tools:
        out["tools"] = chat_tools
        choice = tools.chat_tool_choice(body.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            out["parallel_tool_calls"] = body["parallel_tool_calls"]
    elif body.get("tool_choice") == "required":
        raise BadRequest("tool_choice: required needs a tool this model can call", param="tool_choice")
    out.update(_reasoning(body.get("reasoning"), capabilities))
    if response_format is not None:
        out["response_format"] = response_format
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["user"] = user
    # Deliberately dropped: include, metadata, client_metadata, store: false, truncation,
    # service_tier, stream_options, max_tool_calls, top_logprobs, text.verbosity, reasoning.summary,
    # prompt_cache_key (on the map only) - docs/translation.md.
    return out, tools
