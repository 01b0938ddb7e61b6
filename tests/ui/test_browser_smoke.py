"""The browser fixtures themselves (tests/ui/conftest.py): Debian's Chromium starts under Playwright,
loads a page from a local HTTP server, runs its script, takes a screenshot, and `page` records the
console errors, failed requests and HTTP errors a page causes."""

from __future__ import annotations

import http.server
import threading
from functools import partial

import pytest

# A page without an icon makes Chromium ask for /favicon.ico, a 404 that `page` records as a console error
INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>distml smoke</title>
<link rel="icon" href="data:,"></head>
<body><h1 id="heading">distml</h1><p id="status">static</p>
<script>document.getElementById("status").textContent = "scripted";</script>
</body></html>
"""
BROKEN = """<!doctype html>
<html><head><meta charset="utf-8"><title>broken</title></head>
<body><img src="/missing.png" alt=""><script>console.error("boom");</script></body></html>
"""


@pytest.fixture
def static_site(tmp_path):
    """A static folder served by http.server in a thread on a free local port; its base URL."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(INDEX)
    (tmp_path / "site" / "broken.html").write_text(BROKEN)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tmp_path / "site")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_chromium_loads_a_page_and_takes_a_screenshot(page, static_site, screenshot_dir):
    response = page.goto(f"{static_site}/index.html")
    assert response is not None and response.status == 200
    assert page.title() == "distml smoke"
    assert page.text_content("#status") == "scripted"  # its script ran
    shot = screenshot_dir / "smoke.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not page.errors, page.errors


def test_page_records_console_errors_and_http_errors(page, static_site):
    page.goto(f"{static_site}/broken.html")
    page.wait_for_load_state("load")
    assert any("boom" in entry for entry in page.console_errors), page.console_errors
    assert any(entry.startswith("HTTP 404") and "/missing.png" in entry for entry in page.error_responses)
    assert page.errors  # all of them, in one list


def test_page_records_failed_requests(page, static_site):
    dead = "http://127.0.0.1:9/unreachable.js"  # the discard port: nothing listens there
    page.goto(f"{static_site}/index.html")
    with page.expect_event("requestfailed", lambda request: request.url == dead, timeout=10_000):
        page.evaluate(f"fetch({dead!r}).catch(() => null)")
    assert any("unreachable.js" in entry for entry in page.failed_requests), page.failed_requests
