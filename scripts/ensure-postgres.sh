#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl) exist for the SQL tests.
# Installs Debian's postgresql package when they are missing and we may (root + apt-get).
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing PostgreSQL server from Debian's packages for the SQL tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # the tests start their own private server; the packaged cluster is not needed
  (command -v service >/dev/null && service postgresql stop >/dev/null 2>&1) || true
else
  echo "PostgreSQL server binaries not found and cannot be installed here: PostgreSQL tests will be skipped" >&2
fi
