"""Headless Chromium (Debian's package) driven by Playwright: one launch recipe and screenshot helper."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from playwright.async_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, and this machine has no network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


async def launch(pw: Playwright) -> Browser:
    return await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def screenshots(folder: str) -> Callable[[Page, str], Awaitable[None]]:
    """A `shot(page, name)` that saves full-page PNGs under test-artifacts/<folder>/."""
    where = ARTIFACTS / folder

    async def shot(page: Page, name: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(where / f"{name}.png"), full_page=True)

    return shot
