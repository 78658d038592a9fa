"""The compatibility matrix: which client does what through the gateway, written to docs/compatibility.md.

Each compat test carries ``@pytest.mark.compat(client, capability)`` and is parametrized by the
upstream format (``fmt``); conftest records every outcome here and writes the page at the end of a
session that ran the whole matrix (a partial run leaves the page alone).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.compat.harness import AIDER_VENV, CLIENTS, FORMATS, MODEL_OF_FORMAT, ClientRequest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility.md"


@dataclass(frozen=True)
class Client:
    name: str
    package: str  # as installed by scripts/install-clients
    capabilities: tuple[str, ...]
    not_applicable: dict[str, str] = field(default_factory=dict)
    notes: str = ""


CAPABILITIES = ("text", "stream", "tool round trip", "402 message")

CLIENT_LIST = (
    Client(
        "Claude Code",
        "npm @anthropic-ai/claude-code",
        (*CAPABILITIES, "default model (no ANTHROPIC_MODEL)", "tool round trip, DeepSeek thinking mode"),
        notes="`claude -p PROMPT --allowedTools Read --output-format json` with only "
        "`ANTHROPIC_BASE_URL`, `ANTHROPIC_AUTH_TOKEN` and `ANTHROPIC_MODEL` (plus `DISABLE_TELEMETRY`, "
        "`DISABLE_AUTOUPDATER`, `DISABLE_ERROR_REPORTING`, `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`). "
        "Always streams; `stream` is `--output-format stream-json --verbose --include-partial-messages` "
        "(the text deltas reach its output). Its file tool is `Read` (`file_path`). With no "
        "`ANTHROPIC_MODEL` it asks for its own default (`claude-opus-5-5` in this version), which the "
        'gateway maps through `aliases = ["claude-*", "opus", "sonnet", "haiku"]` on an OpenAI-format '
        "model (openai column only). The DeepSeek thinking-mode row runs the tool round trip on a model "
        'with `reasoning = "deepseek"`: the fake answers with reasoning_content and refuses a tool turn '
        "that does not carry it back, as DeepSeek does. A 402 is not retried; it shows "
        "`API Error: 402 <message>`.",
    ),
    Client(
        "opencode",
        "npm opencode-ai",
        CAPABILITIES,
        notes="`opencode run PROMPT` with an `opencode.json` provider: `@ai-sdk/openai-compatible` or "
        "`@ai-sdk/anthropic` (both bundled), `options.baseURL = <gateway>/v1`, `options.apiKey`; "
        "offline with `OPENCODE_DISABLE_MODELS_FETCH`, `OPENCODE_DISABLE_AUTOUPDATE`, "
        "`OPENCODE_DISABLE_DEFAULT_PLUGINS`, `OPENCODE_DISABLE_LSP_DOWNLOAD`. Always streams "
        "(`stream_options.include_usage` on the OpenAI format); `stream` is `opencode run --format json` "
        "(its event stream). Its file tool is `read` (`filePath`). A 402 is not retried; it shows "
        "`Error: <message>`.",
    ),
    Client(
        "aider",
        "PyPI aider-chat",
        CAPABILITIES,
        not_applicable={
            "tool round trip": "aider has no tool calling: it asks for edits in its own text formats "
            "(whole file, diff) and applies them itself; no tools are ever sent",
        },
        notes="`aider --message PROMPT --no-git --yes-always --no-check-update --no-analytics "
        "--no-show-model-warnings --model openai/<model> --openai-api-base <gateway>/v1 --openai-api-key "
        "<key>` (Anthropic format: `--model anthropic/<model> --anthropic-api-key <key>` with "
        "`ANTHROPIC_API_BASE=<gateway>`), `--no-stream` for `text`, `--stream` for `stream`; offline with "
        "`LITELLM_LOCAL_MODEL_COST_MAP=True` and a `--model-metadata-file` naming the model (else aider "
        "downloads LiteLLM's model list). aider retries any 402 for about a minute whatever the body "
        "says (LiteLLM raises APIError, which aider treats as transient up to its fixed 60 s "
        "RETRY_TIMEOUT); it prints the gateway's message before each `Retrying in ...`, and the test ends "
        "it there.",
    ),
    Client(
        "Codex CLI",
        "npm @openai/codex",
        (*CAPABILITIES, "tool round trip, DeepSeek thinking mode"),
        notes="`codex exec --strict-config --skip-git-repo-check --ephemeral PROMPT` with "
        '`$CODEX_HOME/config.toml`: `model_provider` with `base_url = "<gateway>/v1"`, `env_key`, '
        '`wire_api = "responses"`; offline with `check_for_update_on_startup = false`, `analytics`, '
        "`feedback` off, `otel` exporter none, `history` persistence none and the `plugins` / "
        "`remote_plugin` features off (else it reaches github.com at start). Always streams; `stream` is "
        "`codex exec --json` (JSONL events). Its file reading goes through its shell tool "
        '`exec_command` (`cmd: "cat <file>"`). A 402 is retried five times (`Reconnecting... n/5`, '
        "about 6 s) before it shows `unexpected status 402 Payment Required: <message>`. On the DeepSeek "
        "model it sends no reasoning effort (thinking switch left off); its reasoning item comes back "
        "as the tool turn's reasoning_content. It warns "
        "`Model metadata for <model> not found` (no catalog is read).",
    ),
)
CLIENTS_BY_NAME = {c.name: c for c in CLIENT_LIST}
SINGLE_FORMAT = {
    ("Claude Code", "default model (no ANTHROPIC_MODEL)"): "openai",
    ("Claude Code", "tool round trip, DeepSeek thinking mode"): "openai",
    ("Codex CLI", "tool round trip, DeepSeek thinking mode"): "openai",
}


def expected_cells() -> set[tuple[str, str, str]]:
    cells = set()
    for client in CLIENT_LIST:
        for capability in client.capabilities:
            if capability in client.not_applicable:
                continue
            formats = (
                (SINGLE_FORMAT[(client.name, capability)],)
                if (client.name, capability) in SINGLE_FORMAT
                else FORMATS
            )
            cells |= {(client.name, capability, fmt) for fmt in formats}
    return cells


def installed_versions() -> dict[str, str]:
    """The versions actually installed in .clients/ (not what we meant to pin)."""

    def npm(package: str) -> str:
        try:
            meta = json.loads((CLIENTS / "npm" / "node_modules" / package / "package.json").read_text())
        except (OSError, ValueError):
            return "not installed"
        return str(meta.get("version", "?"))

    aider = "not installed"
    for info in AIDER_VENV.glob("lib/python*/site-packages/aider_chat-*.dist-info"):
        found = re.match(r"aider_chat-(.+)\.dist-info", info.name)
        aider = found.group(1) if found else "?"
    return {
        "Claude Code": npm("@anthropic-ai/claude-code"),
        "opencode": npm("opencode-ai"),
        "aider": aider,
        "Codex CLI": npm("@openai/codex"),
    }


@dataclass
class Results:
    outcomes: dict[tuple[str, str, str], str] = field(default_factory=dict)
    details: dict[tuple[str, str, str], str] = field(default_factory=dict)
    outbound: dict[str, set[str]] = field(default_factory=dict)  # client -> hosts it tried, refused
    sent: dict[tuple[str, str], list[ClientRequest]] = field(
        default_factory=dict
    )  # (client, fmt) -> requests

    def record(self, client: str, capability: str, fmt: str, outcome: str, detail: str = "") -> None:
        key = (client, capability, fmt)
        # A cell with several tests (setup + call) keeps its worst outcome.
        if self.outcomes.get(key) not in ("fail", "error"):
            self.outcomes[key] = outcome
        if detail:
            self.details[key] = detail

    def complete(self) -> bool:
        return expected_cells() <= set(self.outcomes)


def _headers_summary(requests: list[ClientRequest]) -> tuple[list[str], list[str]]:
    generic = {"host", "content-length", "connection", "accept-encoding", "content-type", "accept"}
    names: set[str] = set()
    betas: set[str] = set()
    for r in requests:
        for name, value in r.headers.items():
            low = name.lower()
            if low in generic:
                continue
            names.add(low)
            if low == "anthropic-beta":
                betas |= {b.strip() for b in value.split(",") if b.strip()}
    return sorted(names), sorted(betas)


def _body_keys(requests: list[ClientRequest]) -> list[str]:
    keys: set[str] = set()
    for r in requests:
        if isinstance(r.body, dict):
            keys |= set(r.body)
    return sorted(keys)


def _routes(requests: list[ClientRequest]) -> list[str]:
    seen: dict[str, None] = {}
    for r in requests:
        seen.setdefault(f"{r.method} {r.path}" + ("?" + r.query if r.query else ""), None)
    return list(seen)


def render(results: Results) -> str:
    versions = installed_versions()
    lines = [
        "# Compatibility with real coding clients",
        "",
        "Written by the compatibility suite (`tests/compat/`, run by `./scripts/test` and CI) at the end",
        "of a run of the whole suite; do not edit by hand. Each client is installed at a pinned version",
        "by `scripts/install-clients` and driven non-interactively as a real subprocess through the",
        "gateway (real HTTP on loopback) against a scripted fake upstream, once per upstream format:",
        f"`openai` = the model `{MODEL_OF_FORMAT['openai']}` on an OpenAI Chat Completions upstream,",
        f"`anthropic` = the model `{MODEL_OF_FORMAT['anthropic']}` on an Anthropic Messages upstream.",
        "Clients run offline (proxy variables at a local listener that refuses every request, telemetry",
        "and update checks off).",
        "",
        "- **text**: a plain answer reaches the client's output.",
        "- **stream**: a streamed answer reaches the client's streaming output.",
        "- **tool round trip**: the upstream calls the client's own file-reading tool, the client runs",
        "  it and sends the result back, and the upstream's final answer (quoting a token from the file)",
        "  reaches the client's output.",
        "- **402 message**: with too little credit, the client shows the gateway's message and top-up URL.",
        "",
        "| client | version | capability | openai | anthropic |",
        "| --- | --- | --- | --- | --- |",
    ]
    for client in CLIENT_LIST:
        for capability in client.capabilities:
            cells = []
            for fmt in FORMATS:
                if capability in client.not_applicable:
                    cells.append("n/a")
                elif (client.name, capability) in SINGLE_FORMAT and SINGLE_FORMAT[
                    (client.name, capability)
                ] != fmt:
                    cells.append("-")
                else:
                    cells.append(results.outcomes.get((client.name, capability, fmt), "not run"))
            lines.append(f"| {client.name} | {versions[client.name]} | {capability} | {' | '.join(cells)} |")
    lines += ["", "## Notes per client", ""]
    for client in CLIENT_LIST:
        lines.append(f"- **{client.name}** ({client.package} {versions[client.name]}): {client.notes}")
        for capability, why in client.not_applicable.items():
            lines.append(f"  - {capability}: n/a, {why}.")
    failing = sorted(k for k, v in results.outcomes.items() if v != "pass")
    if failing:
        lines += ["", "## Not passing in this run", ""]
        for key in failing:
            detail = results.details.get(key, "").strip().splitlines()
            why = detail[0][:300] if detail else ""
            lines.append(
                f"- {key[0]} / {key[1]} / {key[2]}: {results.outcomes[key]}" + (f": `{why}`" if why else "")
            )
    lines += [
        "",
        "## What each client sent to the gateway",
        "",
        "Recorded by the suite from the clients' requests (field and header names and beta ids only).",
        "",
        "| client | upstream format | requests | headers (besides the usual) | anthropic-beta | body keys |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for client, fmt in ((c, f) for c in CLIENT_LIST for f in FORMATS):
        sent = results.sent.get((client.name, fmt), [])
        if not sent:
            continue
        headers, betas = _headers_summary(sent)
        lines.append(
            f"| {client.name} | {fmt} | {', '.join(f'`{r}`' for r in _routes(sent)) or '-'} | "
            f"{', '.join(f'`{h}`' for h in headers) or '-'} | {', '.join(f'`{b}`' for b in betas) or '-'} | "
            f"{', '.join(f'`{k}`' for k in _body_keys(sent)) or '-'} |"
        )
    lines += [
        "",
        "## Outbound connections the clients tried",
        "",
        "Every proxy variable points at a local listener that refuses each request and notes its host.",
        "opencode installs `@opencode-ai/plugin` into its config directory in the background at every",
        "start (no setting turns it off); refused, it logs a warning and carries on.",
        "The driving commands and settings per client are in the notes above.",
        "",
    ]
    for client in CLIENT_LIST:
        hosts = sorted(results.outbound.get(client.name, set()))
        lines.append(f"- {client.name}: {', '.join(f'`{h}`' for h in hosts) if hosts else 'none'}")
    return "\n".join(lines) + "\n"


def summarize_detail(longrepr: Any) -> str:
    text = str(longrepr)
    for line in text.splitlines():
        if line.startswith("E "):
            return line[1:].strip()
    return text.splitlines()[-1] if text else ""
