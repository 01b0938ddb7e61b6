#!/usr/bin/env bash
# Make sure Debian's Chromium (/usr/bin/chromium) exists for the real-browser UI tests (tests/ui).
# Playwright drives it with executable_path=/usr/bin/chromium; `playwright install` is never run.
# Installs Debian's chromium package when it is missing and we may (root + apt-get).
set -euo pipefail
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Chromium from Debian's packages for the UI browser tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  # not a skip: tests/ui/conftest.py's browser fixture fails without it
  echo "$CHROMIUM not found and cannot be installed here (needs root and apt-get): the UI browser tests will fail" >&2
fi
