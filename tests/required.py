"""Programs some tests need (tmux, kubectl): skipped where missing, a failure in CI.

`.ci/run` installs them and sets DISTML_REQUIRE_TOOLS, so a missing program cannot pass there as a
skip, as DISTML_REQUIRE_POSTGRES and DISTML_REQUIRE_CLIENTS do for PostgreSQL and the V2 clients.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, install: str) -> str:
    """The path of program `name`; skipped where it is missing, a failure where DISTML_REQUIRE_TOOLS
    is set (`.ci/run`, which installs them), so a missing program cannot pass as a skip in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("DISTML_REQUIRE_TOOLS"):
            pytest.fail(f"{message}; DISTML_REQUIRE_TOOLS is set, so this is an error")
        pytest.skip(message)
    return path
