"""Real-browser fixtures for the UI tests: Debian's Chromium driven by Playwright's sync API.

The browser is /usr/bin/chromium from Debian's `chromium` package (`make chromium`,
scripts/ensure-chromium.sh; `.ci/run` installs it); Playwright's own browser download
(`playwright install`) is never used. A Chromium that cannot start FAILS the tests that need it,
never skips them, so a CI machine without it cannot pass.

`page` records what went wrong while the test browsed: console errors, failed requests and HTTP
responses >= 400, as lists on the page object (`page.console_errors`, `page.failed_requests`,
`page.error_responses`, all three in `page.errors`), so a test ends with `assert not page.errors`.

Every test here that uses `browser` or `page` is in the xdist group "browser": `make test` runs them
one after another on one worker, which launches one Chromium for all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root in a container, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS_ENV = "DISTML_UI_SCREENSHOTS"  # a folder for the tests' screenshots; tmp_path when unset
BROWSER_FIXTURES = {"browser", "page"}


def pytest_itemcollected(item):
    """One Chromium at a time: the browser tests in one xdist group (tests/conftest.py does the same
    for the `heavy` tests; xdist reads the groups after collection)."""
    if BROWSER_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("heavy") is None:
        item.add_marker(pytest.mark.xdist_group("browser"))


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one test module. Not for the session: Playwright's sync API keeps an
    event loop running in the thread while it is started, and later tests on the same worker that
    call asyncio.run() would fail."""
    install = "install it with `make chromium` (scripts/ensure-chromium.sh: Debian's `chromium` package)"
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is not installed; {install}. The UI browser tests need it (they fail, never skip)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(
            f"playwright is not installed ({exc}); it is in the dev extra: `make setup` or `pip install -e '.[dev]'`"
        )
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except Exception as exc:
        playwright.stop()
        pytest.fail(f"Chromium ({CHROMIUM}) could not start under Playwright: {exc}\n{install}")
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


@pytest.fixture
def page(browser):
    """A fresh page in its own browser context, recording every console error, failed request and
    HTTP error response in lists on it (see the module's docstring)."""
    context = browser.new_context()
    page = context.new_page()
    page.console_errors = []
    page.failed_requests = []
    page.error_responses = []
    page.errors = []

    def on_console(msg):
        if msg.type == "error":
            entry = f"console error: {msg.text} ({msg.location.get('url', '')}:{msg.location.get('lineNumber', '')})"
            page.console_errors.append(entry)
            page.errors.append(entry)

    def on_request_failed(request):
        entry = f"request failed: {request.method} {request.url} ({request.failure})"
        page.failed_requests.append(entry)
        page.errors.append(entry)

    def on_response(response):
        if response.status >= 400:
            entry = f"HTTP {response.status}: {response.request.method} {response.url}"
            page.error_responses.append(entry)
            page.errors.append(entry)

    def on_page_error(exc):  # an uncaught exception in the page's scripts
        entry = f"page error: {exc}"
        page.console_errors.append(entry)
        page.errors.append(entry)

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("requestfailed", on_request_failed)
    page.on("response", on_response)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """Where a test writes its screenshots: $DISTML_UI_SCREENSHOTS (kept after the run) or tmp_path."""
    folder = Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
