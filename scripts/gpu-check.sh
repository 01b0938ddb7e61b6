#!/usr/bin/env bash
# Check distml's CUDA paths on a machine with a GPU: `distml train --device auto` on NCCL (one
# rank per GPU), two ranks on one GPU over gloo, the parameter server with CUDA workers, and
# the throughput of the cnn training step. Writes a JSON summary to ${OUT:-.}/gpu-check.json.
set -u
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site"
else
  export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-.}"
WS=/tmp/distml-gpu-ws
rm -rf "$WS"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
train() { python3 -m distml.cli --workspace "$WS" train --dataset digits "$@" 2>&1 | grep -v "^step " ; }
train --workers 1 --device auto --epochs 20 --run-id nccl-1
train --workers 2 --device cuda --epochs 20 --run-id gloo-2-on-1-gpu
train --workers 1 --device cuda --strategy parameter-server --epochs 10 --run-id ps-cuda
python3 - "$WS" "$OUT/gpu-check.json" <<'PY'
import json, statistics, sys, time
import torch
from distml.models.zoo import build_model
from distml.train.store import train_history
from distml.train.allreduce import AllReduceTrainer
from distml.workspace import Workspace

ws, out = Workspace(sys.argv[1]), sys.argv[2]
summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}, "eager_step": {}}
for run in ("nccl-1", "gloo-2-on-1-gpu", "ps-cuda"):
    try:
        result = json.loads((ws.root / "runs" / run / "result.json").read_text())
        rows = train_history(ws.engine, run)[5:]
        summary["runs"][run] = {"test_accuracy": result["test_accuracy"], "steps": result["steps"],
                                "median_samples_per_s": statistics.median(r.samples_per_s for r in rows)}
    except Exception as exc:  # report, do not hide
        summary["runs"][run] = {"error": f"{type(exc).__name__}: {exc}"}
device = torch.device("cuda", 0)
for batch in (64, 512, 4096):
    torch.manual_seed(0)
    trainer = AllReduceTrainer(build_model("cnn"), 1e-3, device, world_size=1)
    x = torch.randn(batch, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(20):
        trainer.train_step(x, y)
    torch.cuda.synchronize()
    steps = 200 if batch < 4096 else 50
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    torch.cuda.synchronize()
    summary["eager_step"][f"batch_{batch}_samples_per_s"] = round(batch * steps / (time.perf_counter() - start))
print(json.dumps(summary, indent=1))
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
PY
