"""The freeform input of a custom tool, recovered from the JSON arguments of the function standing
for it upstream: whole (``custom_input_from_arguments``) or as the fragments stream in
(``InputExtractor``), so ``response.custom_tool_call_input.delta`` can follow the model live.
"""

from __future__ import annotations

import json

__all__ = ["InputExtractor", "custom_input_from_arguments"]


def custom_input_from_arguments(arguments: str) -> str:
    """Models answer ``{"input": "..."}``; a model that used another single key or sent broken JSON
    still gets its text through: that key's string, else the raw arguments."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return arguments
    if isinstance(parsed, dict):
        value = parsed.get("input")
        if isinstance(value, str):
            return value
        strings = [v for v in parsed.values() if isinstance(v, str)]
        if len(strings) == 1 and len(parsed) == 1:
            return strings[0]
        return arguments if parsed else ""
    return parsed if isinstance(parsed, str) else arguments


_PREFIX = '{"input":"'  # compared with whitespace between tokens skipped
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class InputExtractor:
    """Decodes the string value of ``{"input": "...`` incrementally.

    ``feed`` returns the newly decoded text. If the arguments do not start that way (another key
    first), nothing is streamed (``started`` stays False) and the caller falls back to
    ``custom_input_from_arguments`` on the whole arguments at the end.
    """

    __slots__ = ("_buf", "_matched", "_pending_high", "_state", "started")

    def __init__(self) -> None:
        self._buf = ""
        self._matched = 0  # characters of _PREFIX matched so far
        self._state = "prefix"  # prefix | string | closed | fallback
        self._pending_high: str | None = None  # a high surrogate waiting for its pair
        self.started = False

    def feed(self, fragment: str) -> str:
        if self._state in ("closed", "fallback"):
            return ""
        self._buf += fragment
        if self._state == "prefix":
            self._match_prefix()
            if self._state != "string":
                return ""
        return self._decode()

    def _match_prefix(self) -> None:
        i = 0
        buf = self._buf
        while i < len(buf):
            ch = buf[i]
            if ch in " \t\r\n" and self._matched in (0, 1, 8, 9):  # around {, "input", :
                i += 1
                continue
            if ch != _PREFIX[self._matched]:
                self._state = "fallback"
                return
            self._matched += 1
            i += 1
            if self._matched == len(_PREFIX):
                self._state = "string"
                self.started = True
                self._buf = buf[i:]
                return
        self._buf = ""

    def _decode(self) -> str:
        out: list[str] = []
        buf = self._buf
        i = 0
        while i < len(buf):
            ch = buf[i]
            if ch == '"':
                self._state = "closed"
                i = len(buf)
                break
            if ch != "\\":
                j = i
                while j < len(buf) and buf[j] not in '"\\':
                    j += 1
                out.append(self._flush_high() + buf[i:j])
                i = j
                continue
            if i + 1 >= len(buf):
                break  # the escape continues in the next fragment
            esc = buf[i + 1]
            if esc == "u":
                if i + 6 > len(buf):
                    break
                try:
                    code = int(buf[i + 2 : i + 6], 16)
                except ValueError:
                    code = 0xFFFD
                i += 6
                char = chr(code)
                if 0xD800 <= code <= 0xDBFF:
                    out.append(self._flush_high())
                    self._pending_high = char
                elif 0xDC00 <= code <= 0xDFFF and self._pending_high is not None:
                    pair = self._pending_high + char
                    self._pending_high = None
                    out.append(pair.encode("utf-16", "surrogatepass").decode("utf-16"))
                else:
                    out.append(self._flush_high() + char)
                continue
            out.append(self._flush_high() + _ESCAPES.get(esc, esc))
            i += 2
        self._buf = buf[i:]
        return "".join(out)

    def _flush_high(self) -> str:
        # A lone high surrogate cannot be encoded; it becomes U+FFFD as json.loads would not.
        if self._pending_high is None:
            return ""
        self._pending_high = None
        return "\ufffd"
