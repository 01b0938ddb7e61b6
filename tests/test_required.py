"""tests/required.py: a program a test needs is a skip on a developer's machine, a failure in CI."""

from __future__ import annotations

import pytest
from required import require_tool

MISSING = "distml-no-such-program"


def test_a_missing_program_skips_without_distml_require_tools(monkeypatch):
    monkeypatch.delenv("DISTML_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not installed \\(apt-get install it\\)"):
        require_tool(MISSING, "apt-get install it")


def test_a_missing_program_fails_under_distml_require_tools(monkeypatch):
    monkeypatch.setenv("DISTML_REQUIRE_TOOLS", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="DISTML_REQUIRE_TOOLS is set, so this is an error"):
        require_tool(MISSING, "apt-get install it")


def test_a_present_program_is_found_by_its_path(monkeypatch):
    monkeypatch.setenv("DISTML_REQUIRE_TOOLS", "1")
    assert require_tool("sh", "part of every system").endswith("/sh")
