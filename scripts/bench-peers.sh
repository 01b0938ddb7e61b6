#!/usr/bin/env bash
# Create .venv-peers, the environment of the benchmarks' peers (the tools we compare against),
# separate from .venv so that none of them lands in distml's own environment. Benchmarks start
# the peers as subprocesses of .venv-peers/bin/python. Idempotent: a pinned requirement that is
# already installed is not installed again, a set-up already done is not done again.
# Add a peer: one line in PEERS (pin its version), and its one-time set-up at the end if it has one.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-peers

# One pip requirement per entry, pinned: the versions the benchmark results report.
PEERS=(
    "prefect==3.9.1" # benchmarks/workflow.py: workflow engine, per-task overhead
)

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# git ignores the whole folder (as `python -m venv` itself arranges from Python 3.13 on)
[ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"

missing=()
for req in "${PEERS[@]}"; do
    name="${req%%[=<>!~ ;\[]*}"
    want=""
    [[ "$req" == *"=="* ]] && want="${req#*==}"
    have="$("$VENV/bin/python" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass' "$name")"
    if [ -z "$have" ] || { [ -n "$want" ] && [ "$have" != "$want" ]; }; then
        missing+=("$req")
    else
        echo "$name $have already installed in $VENV"
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing into $VENV: ${missing[*]}"
    "$VENV/bin/pip" install -q "${missing[@]}"
fi

# Prefect: an empty database migrated once for the installed version (about 20 s), which
# benchmarks/workflow.py copies into its temporary PREFECT_HOME, as a local Prefect keeps its
# database between runs (a fresh one costs every benchmark run the migrations again).
if [ -x "$VENV/bin/prefect" ]; then
    version="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("prefect"))')"
    template="$VENV/prefect-template"
    if [ "$(cat "$template/VERSION" 2>/dev/null)" != "$version" ]; then
        echo "migrating an empty Prefect $version database in $template"
        rm -rf "$template"
        mkdir -p "$template"
        (
            for var in $(compgen -e | grep '^PREFECT_' || true); do unset "$var"; done
            export PREFECT_HOME="$template" PREFECT_SERVER_ANALYTICS_ENABLED=false
            export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$PWD/$template/prefect.db"
            "$VENV/bin/prefect" server database upgrade -y >/dev/null
        )
        echo "$version" >"$template/VERSION"
    fi
fi
echo "$VENV ready ($("$VENV/bin/python" --version))"
