"""Ready-to-paste settings for each coding tool, from one place: the start-up banner, the dashboard's
key page and the README show the same text (a test holds the README to it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CODEX_ENV_KEY", "ToolSetup", "tool_setups"]

CODEX_ENV_KEY = "CODINGPLAN_API_KEY"


@dataclass(frozen=True, slots=True)
class ToolSetup:
    tool: str  # a heading for people
    slug: str  # an id for pages and tests
    where: str  # where the text goes
    text: str


def tool_setups(base_url: str, key: str, *, model: str | None = None) -> list[ToolSetup]:
    """``model``: the model to name where a tool needs one (Codex, the SDK line); Claude Code needs
    none, its own model names are aliases of the operator's choice."""
    base = base_url.rstrip("/")
    model = model or "deepseek-chat"
    claude = (
        f'export ANTHROPIC_BASE_URL="{base}"\n'
        f'export ANTHROPIC_AUTH_TOKEN="{key}"\n'
        "# Optional: pick models from GET /v1/models instead of the operator's default for Claude's names\n"
        f'# export ANTHROPIC_MODEL="{model}" ANTHROPIC_DEFAULT_HAIKU_MODEL="{model}"'
    )
    codex = (
        f'# ~/.codex/config.toml, then: export {CODEX_ENV_KEY}="{key}"\n'
        f'model = "{model}"\n'
        'model_provider = "codingplan"\n'
        "\n"
        "[model_providers.codingplan]\n"
        'name = "Coding Plan"\n'
        f'base_url = "{base}/v1"\n'
        f'env_key = "{CODEX_ENV_KEY}"\n'
        'wire_api = "responses"'
    )
    openai_env = f'export OPENAI_BASE_URL="{base}/v1"\nexport OPENAI_API_KEY="{key}"'
    python = f'from openai import OpenAI\nclient = OpenAI(base_url="{base}/v1", api_key="{key}")'
    return [
        ToolSetup("Claude Code", "claude", "your shell profile, then run claude", claude),
        ToolSetup("Codex CLI", "codex", "~/.codex/config.toml and your shell profile, then run codex", codex),
        ToolSetup(
            "OpenAI-compatible tools (opencode, Cline, aider, Continue, llm)",
            "openai",
            "environment variables, or the tool's base URL and API key settings",
            openai_env,
        ),
        ToolSetup("OpenAI SDK (Python)", "python", "your code", python),
    ]
