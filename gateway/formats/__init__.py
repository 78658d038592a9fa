"""The client formats the proxy serves, as a table: how each one's request is read, and for each
upstream format how it is sent and how the answer comes back.

The proxy looks a client format up here and never branches on a format itself. A client format is an
``Intake`` (validation, input count, output cap) plus one ``Route`` per upstream format. A route
without translators is a passthrough: the request gets only its model and caps patched, and the
answer's bytes (an upstream error's too) go back as they came, with the model name echoed. A new
client format is a module here and one line below.
"""

from __future__ import annotations

from .base import ClientFormat, Intake, Outgoing, ReplyContext, Route, StreamTranslator
from .chat import OPENAI
from .messages import ANTHROPIC
from .responses import RESPONSES, RESPONSES_COMPACT

__all__ = ["FORMATS", "ClientFormat", "Intake", "Outgoing", "ReplyContext", "Route", "StreamTranslator"]

FORMATS: dict[str, ClientFormat] = {f.name: f for f in (OPENAI, ANTHROPIC, RESPONSES, RESPONSES_COMPACT)}
