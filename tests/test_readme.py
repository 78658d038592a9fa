"""What the README claims about setting up a coding tool is what the gateway prints."""

from __future__ import annotations

from pathlib import Path

from gateway.client_setup import tool_setups
from gateway.models import load_registry
from gateway.settings import DEFAULT_MODELS_FILE

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_readme_starts_with_the_two_commands() -> None:
    assert README.startswith("```\n./scripts/run\n./scripts/test\n```\n")


def test_the_readme_shows_each_tools_setup_as_the_banner_and_dashboard_print_it() -> None:
    model = load_registry(DEFAULT_MODELS_FILE, {}).suggested_model()
    assert model == "deepseek-chat"
    for setup in tool_setups("http://127.0.0.1:8080", "<key>", model=model):
        assert setup.text in README, setup.tool
