#!/usr/bin/env bash
# Create .venv-peers, the environment of the benchmarks' peers (the tools we compare against),
# separate from .venv so that none of them lands in distml's own environment. Benchmarks start
# the peers as subprocesses of .venv-peers/bin/python. Idempotent: a pinned requirement that is
# already installed is not installed again, a set-up already done is not done again.
# Add a peer: its pinned requirements as one entry of PEERS, an import check in CHECKS, and its
# one-time set-up at the end if it has one. VENV=other/path (and PYTHON=python3.x) make another one.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-peers}"

# One entry per pip call, whose requirements pip resolves together; pinned: the versions the
# benchmark results report. An entry that cannot be installed is reported and skipped, the others
# still are. Every call also gets all the pins below as constraints (so no later call moves an
# earlier peer) and torch==2.13.0 (the CPU build from this machine's disk: a plain `torch`
# requirement, or any newer one, would pull a multi-GB CUDA build).
PEERS=(
    # first, alone: streaming and datasets' torch format need torch
    "torch==2.13.0"
    # benchmarks/workflow.py: workflow engine, per-task overhead
    "prefect==3.9.1"
    # benchmarks/training.py: the book's stack, MultiWorkerMirroredStrategy; tf-keras is Keras 2
    # (Keras 3's MultiWorkerMirroredStrategy fails)
    "tensorflow-cpu==2.21.0 tf-keras==2.21.0"
    # benchmarks/ingest.py: Hugging Face datasets (Arrow-backed) and Mosaic StreamingDataset (MDS
    # shards), in one call. streaming 0.13.0 needs transformers<5, hence huggingface-hub<1.0, and
    # numpy<2.2: datasets 5.x needs hub>=1.31, 4.8.5 is the newest that accepts hub 0.x.
    # streaming imports torchvision (streaming/vision) and requires it; PyPI's 0.28.0 is the one
    # for torch 2.13.0 (it pins torch==2.13.0, so it keeps the CPU build), but it is built for CUDA
    # and its import fails beside the CPU torch unless its two unguarded op schemas exist first:
    # benchmarks/ingest.py defines them before `import streaming` (streaming's own code uses none
    # of torchvision's operators), as the check below does.
    "datasets==4.8.5 mosaicml-streaming==0.13.0 torchvision==0.28.0"
    # benchmarks/serving.py: Ray Serve behind its HTTP proxy
    "ray[serve]==2.60.0"
    # benchmarks/ui.py: MLflow's tracking server (benchmarks/peers/mlflow_tracking.py). 3.17.2: the
    # mlflow-tracing 3.18.0 that mlflow 3.18.0 requires is not on the package index this machine uses
    "mlflow==3.17.2"
)
# What each entry must import (same order as PEERS); a failure is reported, not fatal.
TORCHVISION_SCHEMAS='import torch
lib = torch.library.Library("torchvision", "DEF")
lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")'
CHECKS=(
    'import torch; assert torch.version.cuda is None, torch.__version__'
    'import prefect'
    'import tensorflow, tf_keras'
    "$TORCHVISION_SCHEMAS
import warnings; warnings.simplefilter('ignore')
import datasets, streaming
from streaming import MDSWriter, StreamingDataset"
    'import ray; from ray import serve'
    'import mlflow; from mlflow.tracking import MlflowClient; from mlflow.server import app'
)

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# git ignores the whole folder (as `python -m venv` itself arranges from Python 3.13 on)
[ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"

constraints="$VENV/peer-constraints.txt"
for entry in "${PEERS[@]}"; do
    for req in $entry; do echo "${req/\[*\]/}"; done
done >"$constraints"

installed_version() {
    "$VENV/bin/python" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass' "$1"
}

failed=()
for entry in "${PEERS[@]}"; do
    todo=()
    for req in $entry; do
        name="${req%%[=<>!~ ;\[]*}"
        want=""
        [[ "$req" == *"=="* ]] && want="${req#*==}"
        have="$(installed_version "$name")"
        # a local label (2.13.0+cpu) satisfies ==2.13.0, as it does for pip
        if [ -z "$have" ] || { [ -n "$want" ] && [ "${have%%+*}" != "$want" ]; }; then
            todo+=("$req")
        else
            echo "$name $have already installed in $VENV"
        fi
    done
    if [ "${#todo[@]}" -gt 0 ]; then
        echo "installing into $VENV: $entry"
        # the whole entry, so that pip resolves its requirements together
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install -q -c "$constraints" $entry 2> >(grep -v "^WARNING: Location" >&2) || failed+=("$entry")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "could not install into $VENV: ${failed[*]} (the benchmarks that need them skip those peers)" >&2
fi

# Every peer must import in this one environment: a pin that pip accepted can still break another
# peer's import (as datasets 5.x did once streaming had moved huggingface-hub back to 0.x).
broken=()
for i in "${!PEERS[@]}"; do
    if ! out="$("$VENV/bin/python" -c "${CHECKS[$i]}" 2>&1)"; then
        echo "$VENV: ${PEERS[$i]} does not import: $(echo "$out" | tail -n 1)" >&2
        broken+=("${PEERS[$i]}")
    fi
done
[ "${#broken[@]}" -eq 0 ] && echo "every peer imports in $VENV"

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
