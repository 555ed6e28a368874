"""Headless Chromium for the browser tests: Debian's package driven by the Python Playwright.

Playwright's own browser download does not work here (and is never attempted): the tests use
the system Chromium, installing Debian's package when it is missing and we are root. Outside CI
a machine without it skips the browser tests with the reason; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    """Path of a Chromium binary, installing Debian's ``chromium`` when missing and root."""
    found = _find_chromium()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True
        )
        found = _find_chromium()
        if found:
            return found
        _unavailable(
            "`apt-get install -y chromium` failed: " + done.stderr.decode(errors="replace")[-500:]
        )
    _unavailable(
        "Chromium is needed by the browser tests: install it with "
        "`sudo apt-get install -y chromium` (Debian/Ubuntu)"
    )
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    try:
        import playwright  # noqa: F401
    except ImportError:
        _unavailable("the Python package playwright is missing: pip install -e '.[dev]'")
    return ensure_chromium()


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    """A headless Chromium of this test's own (each page gets its own context)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield b
        finally:
            await b.close()
