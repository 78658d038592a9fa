"""Coding Plan gateway: metered OpenAI/Anthropic API passthrough and translation."""
