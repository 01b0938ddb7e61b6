"""What an exported Argo step's container runs: one node of the same pipeline, by its node id.

`python -m distml.export.steprunner PIPELINE.json COMMAND NODE [--input NODE=JSON ...]` builds the
pipeline's graph (without running it), puts the upstream values Argo passes in place of the
upstream nodes, and then: `key` writes the node's memo key (the local orchestrator's own key,
from `workflow.memo`), `run` runs the step function and writes its stored result, and for a
training step `prepare` writes the run's TrainConfig onto the workspace volume (and the key),
`collect` turns the finished run's result.json into the step's result. Outputs go to OUT_DIR,
where Argo's output parameters read them. Argo's own executor was the alternative; it cannot
compute distml's memo keys or run a step with distml's workspace and value encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from distml.core import DB_URL_ENV
from distml.core.errors import DistmlError

OUT_DIR = "/tmp/distml-out"  # the container's output parameters are read from here


class PipelineSpec(BaseModel):
    """The one config every step container reads (a ConfigMap): which pipeline, with which parameters."""

    model_config = ConfigDict(extra="forbid")

    target: str
    params: dict[str, Any] = {}
    workspace: str
    nnodes: str = "1"  # training jobs' node count (MIN:MAX: elastic)


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    try:
        return PipelineSpec.model_validate_json(Path(path).read_text())
    except (OSError, ValidationError) as exc:
        raise DistmlError(f"cannot read the pipeline config {path}: {exc}") from None


def build_graph(spec: PipelineSpec) -> Any:
    from distml.workflow.dag import build
    from distml.workflow.target import load_target

    graph, _ = build(load_target(spec.target).function, dict(spec.params))
    return graph


def _node(graph: Any, node_id: str) -> Any:
    node = graph.nodes.get(node_id)
    if node is None or node.step is None:
        raise DistmlError(f"the pipeline has no step node {node_id!r}; nodes: {', '.join(graph.nodes)}")
    return node


def stored_args(node: Any, inputs: dict[str, Any]) -> tuple[list, dict]:
    """The node's arguments with each upstream node replaced by its stored value (as the orchestrator has them)."""
    from distml.workflow.dag import substitute

    def resolve(up: Any) -> Any:
        if up.id not in inputs:
            raise DistmlError(f"step {node.id} needs the value of {up.id}; pass --input {up.id}=JSON")
        return inputs[up.id]

    return substitute(list(node.args), resolve), substitute(dict(node.kwargs), resolve)


def memo_key(node: Any, args: list, kwargs: dict, ws: Any, run_id: str) -> tuple[str, dict]:
    """The node's memo key and its parts, computed as the local orchestrator computes them."""
    from distml.workflow import memo
    from distml.workflow.executor import StepContext, using_context
    from distml.workflow.values import decode

    policy = node.step.policy
    data = None
    if policy.fingerprint is not None:
        with using_context(StepContext(run_id, node.id, 0, ws, None)):
            data = policy.fingerprint(*decode(ws, args), **decode(ws, kwargs))
    parts = memo.key_parts(node, memo.bind(node.step, tuple(args), kwargs), data, {})
    return memo.memo_key(parts), parts


def _write(out_dir: Path, name: str, text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(text)


def training_config(spec: PipelineSpec, node: Any, args: list, kwargs: dict, ws: Any, run_id: str) -> Any:
    """The TrainConfig the cluster's training job runs for a training node (the step's own spec):
    one worker per pod, the pods meeting at the job's master, the store's URL from the pods' Secret."""
    from distml.train.config import TrainConfig
    from distml.workflow.executor import StepContext, using_context
    from distml.workflow.values import decode

    with using_context(StepContext(run_id, node.id, 0, ws, None)):
        config = node.step.policy.spec(*decode(ws, args), **decode(ws, kwargs))
    if not isinstance(config, TrainConfig):
        raise DistmlError(
            f"the spec of training step {node.id} returned {type(config).__name__}; expected a TrainConfig"
        )
    workers = node.step.policy.resources.workers
    nnodes = spec.nnodes if spec.nnodes != "1" else str(workers)
    # Each pod runs one worker: the gang is `workers` pods (or MIN:MAX with --nnodes). The URL of the
    # metadata store stays out of the file on the volume: each pod reads it from the Secret.
    changes = {
        "parallelism.workers": 1,
        "parallelism.nnodes": nnodes,
        "parallelism.rdzv_endpoint": "master:29400",
        "workspace": {"root": str(ws.root), "db_url": None},
        "job.run_id": config.resolved_run_id(),  # the job finds its config at runs/RUN_ID/config.json
    }
    return config.updated(changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distml.export.steprunner")
    parser.add_argument("spec", help="the pipeline config (JSON) `distml export k8s` wrote")
    parser.add_argument("command", choices=["key", "run", "prepare", "collect"])
    parser.add_argument("node")
    parser.add_argument("--input", action="append", default=[], metavar="NODE=JSON")
    parser.add_argument("--run-id", default="local", help="the workflow run (Argo's workflow name)")
    parser.add_argument("--out", default=OUT_DIR)
    ns = parser.parse_args(argv)
    try:
        _main(ns)
    except DistmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _main(ns: argparse.Namespace) -> None:
    from distml.workflow.executor import StepContext, using_context
    from distml.workflow.values import canonical, decode, encode
    from distml.workspace import Workspace

    spec = load_spec(ns.spec)
    inputs: dict[str, Any] = {}
    for item in ns.input:
        name, sep, text = item.partition("=")
        if not sep:
            raise DistmlError(f"--input takes NODE=JSON, got {item!r}")
        try:
            inputs[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DistmlError(f"--input {name}: not JSON ({exc})") from None
    node = _node(build_graph(spec), ns.node)
    args, kwargs = stored_args(node, inputs)
    ws = Workspace(spec.workspace, os.environ.get(DB_URL_ENV))  # a cluster's pod: the URL from a Secret
    out = Path(ns.out)
    if ns.command in ("key", "prepare"):
        key, parts = memo_key(node, args, kwargs, ws, ns.run_id)
        _write(out, "key", key)
        _write(out, "key-parts.json", canonical(parts))
        if ns.command == "prepare":
            config = training_config(spec, node, args, kwargs, ws, ns.run_id)
            run_dir = config.run_dir()
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(config.model_dump_json(indent=1))
            _write(out, "run-id", config.job.run_id)
        return
    if ns.command == "collect":
        config = training_config(spec, node, args, kwargs, ws, ns.run_id)
        result_path = config.run_dir() / "result.json"
        if not result_path.is_file():
            raise DistmlError(f"training run {config.job.run_id} has no result ({result_path}); did its job succeed?")
        result = json.loads(result_path.read_text())
        collect = node.step.policy.collect
        if collect is not None:
            result = collect(config, result, *decode(ws, args), **decode(ws, kwargs))
        _write(out, "result", canonical(encode(ws, result, f"the result of step {node.id}")))
        return
    fn = node.step.fn
    with using_context(StepContext(ns.run_id, node.id, 0, ws, None)):
        result = fn(*decode(ws, args), **decode(ws, kwargs))
    _write(out, "result", canonical(encode(ws, result, f"the result of step {node.id}")))


if __name__ == "__main__":
    sys.exit(main())
