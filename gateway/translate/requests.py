"""Request bodies translated between Anthropic Messages and OpenAI Chat Completions (pure, no I/O).

One module per direction; field-level decisions (dropped or refused with 400) are tabled in
docs/translation.md.
"""

from __future__ import annotations

from gateway.translate.request_to_anthropic import openai_to_anthropic_request
from gateway.translate.request_to_openai import MAX_STOP_SEQUENCES, anthropic_to_openai_request

__all__ = ["MAX_STOP_SEQUENCES", "anthropic_to_openai_request", "openai_to_anthropic_request"]
