"""The demo page in headless Chromium, for tests/test_demo.py and build_model.py --screenshot.

Chromium is Debian's (`apt-get install chromium`, /usr/bin/chromium), driven by Playwright
for Python; `playwright install`, which downloads a browser of its own, is not needed.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SERVE = Path(__file__).resolve().parent / "serve.py"
CHROMIUM = Path("/usr/bin/chromium")
# As root in a container with no network: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
READY_MS = 60_000  # for the model to load and the first grid to draw


@contextlib.contextmanager
def serve(model: Path | None = None) -> Iterator[str]:
    """Runs demo/serve.py on a free localhost port; yields its base URL."""
    command = [sys.executable, str(SERVE), "--port", "0"]
    if model is not None:
        command += ["--model", str(model)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if "http://" not in line:
            server.wait(timeout=10)
            raise RuntimeError(f"demo/serve.py did not start: {line}{server.stderr.read()}")
        yield line.split(" at ", 1)[1].split(" ", 1)[0]
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Debian Chromium under Playwright (a `playwright.sync_api.Browser`)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for_renders(page: Any, count: int) -> None:
    """Waits until the grid has been drawn `count` times since the page loaded, or an error
    shows (which then fails the wait with the page's message)."""
    page.wait_for_function(
        """count => Number(document.getElementById('grid').dataset.renders || 0) >= count
                    || document.getElementById('status').className === 'error'""",
        arg=count, timeout=READY_MS)
    error = page.locator("#status.error")
    if error.count():
        raise RuntimeError(f"the page shows an error: {error.text_content()}")
