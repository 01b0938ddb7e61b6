"""The end-to-end pipeline: ingest a data set, train candidate CNNs on several workers, pick and serve the best.

`distml run` runs it: ingest (memoized for an hour; a data snapshot is recorded), fan-out of
one allreduce training per candidate on a gang of `workers` processes, a fan-in that evaluates
every candidate on the test split and registers the best as `<dataset>-classifier@production`,
and a service that serves it (started, left alone, or hot-swapped). With `async_selection` the
service starts on the first trained candidate and swaps to each better one as it finishes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Literal

from distml.core.layout import service_dir
from distml.pipelines.promotion import decide, test_accuracy
from distml.scheduling.core import Resources
from distml.workflow import best_of, current, step

CANDIDATES = ("cnn", "dropout", "batch_norm")


def data_fingerprint(dataset: str, data_dir: str | None = None) -> str:
    """Content fingerprint of the data set's source data (part of ingest's memo key)."""
    from distml.data.datasets import dataset_fingerprint

    return dataset_fingerprint(dataset, current().workspace, data_dir)


@step(memoize=True, max_age=3600, fingerprint=data_fingerprint)
def ingest(dataset: str, data_dir: str | None = None) -> dict:
    """Download or locate the data, verify it, cache it preprocessed and record each split's snapshot."""
    from distml.data.datasets import prepare_dataset

    rows = prepare_dataset(dataset, current().workspace, data_dir)
    return {"dataset": dataset, "data_dir": data_dir, "splits": {row["split"]: row for row in rows}}


def _report_training(ctx: Any, run_id: str, total: int, stop: threading.Event) -> None:
    """Forward the training run's recorded step to the live view until `stop` is set."""
    from distml.train.store import train_history

    while not stop.wait(1.0):
        try:
            history = train_history(ctx.workspace.engine, run_id)
        except Exception:  # the progress line is best effort; training goes on
            continue
        if history:
            last = history[-1]
            ctx.progress(last.step, total, f"loss {last.loss:.3f}")


def train_config(model: str, data: dict, workspace: Any, epochs: int, workers: int, batch_size: int, seed: int) -> Any:
    """The TrainConfig of one candidate's run in `workspace` (a WorkspaceRef; also what `distml
    export k8s` writes for a cluster's job).

    One training run per data snapshot: a re-run after a crash resumes its checkpoint."""
    from distml.train.config import parse_config

    config = parse_config(
        {
            "model": {"name": model},
            "data": {"dataset": data["dataset"], "data_dir": data["data_dir"], "batch_size": batch_size},
            "training": {"epochs": epochs, "seed": seed},
            "parallelism": {"workers": workers},
            "checkpoint": {"every": 10},
            "workspace": workspace,
        }
    )
    run_id = f"{config.resolved_run_id()}-{data['splits']['train']['fingerprint'][:10]}"
    return config.updated({"job.run_id": run_id})


def train_output(model: str, data: dict, run_id: str, result: dict) -> dict:
    """What the train step returns for a finished run's `result`."""
    return {
        "candidate": model,
        "model": result["model"],
        "test_accuracy": result["test_accuracy"],
        "steps": result["steps"],
        "train_run": run_id,
        "data_snapshots": sorted(split["snapshot_id"] for split in data["splits"].values()),
    }


def train_spec(model: str, data: dict, epochs: int = 5, workers: int = 2, batch_size: int = 64, seed: int = 0) -> Any:
    """The run `train` launches (what a cluster's training job runs too)."""
    ws = current().workspace
    return train_config(model, data, ws.ref, epochs, workers, batch_size, seed)


def train_collect(config: Any, result: dict, model: str, data: dict, *args: Any, **kwargs: Any) -> dict:
    """`train`'s value from its finished run."""
    return train_output(model, data, config.job.run_id, result)


@step(kind="training", spec=train_spec, collect=train_collect, memoize=True, retries=1)
def train(model: str, data: dict, epochs: int = 5, workers: int = 2, batch_size: int = 64, seed: int = 0) -> dict:
    """Train one candidate with allreduce on `workers` processes (PyTorch's elastic launcher)."""
    from distml.core.errors import DistmlError
    from distml.train.launcher import launch

    ctx = current()
    train_split = data["splits"]["train"]
    config = train_spec(model, data, epochs, workers, batch_size, seed)
    run_id = config.job.run_id
    total = epochs * math.ceil(train_split["records"] / (batch_size * workers))
    stop = threading.Event()
    reporter = threading.Thread(target=_report_training, args=(ctx, run_id, total, stop), daemon=True)
    reporter.start()
    try:
        result = launch(config)
    finally:
        stop.set()
    if result is None:
        raise DistmlError(f"training run {run_id} stopped before the end")
    ctx.progress(result["steps"], total, f"test accuracy {result['test_accuracy']:.4f}")
    return train_collect(config, result, model, data)


def select_model(
    ws: Any,
    candidates: list,
    data: dict,
    name: str,
    alias: str = "production",
    margin: float = 0.0,
    promote: Literal["better", "always"] = "better",
    lineage: dict | None = None,
    log_metric: Callable[[str, float], Any] | None = None,
) -> dict:
    """`select`'s work: every candidate and the current NAME@ALIAS on the data set's test split; the
    best candidate is registered as NAME and becomes NAME@ALIAS if it beats that model by more than
    `margin` (`decide`, as the watch does), or with promote="always"; otherwise ALIAS stays where
    it is. The returned "model" is what NAME@ALIAS names afterwards (what `serve` serves)."""
    from distml.data.datasets import get_dataset
    from distml.models import registry
    from distml.models.artifact import register_as, resolve_model, set_alias

    log_metric = log_metric or (lambda key, value: None)
    ds = get_dataset(data["dataset"], ws, data["data_dir"], progress=False)
    scores = {}
    for candidate in candidates:
        scores[candidate["model"]] = test_accuracy(ws, candidate["model"], ds)
        log_metric(f"{candidate['model']}.test_accuracy", scores[candidate["model"]])
        print(f"{candidate['model']}: test accuracy {scores[candidate['model']]:.4f}", flush=True)
    best = max(candidates, key=lambda c: scores[c["model"]])  # the first of equals wins
    production = None
    version = registry.get_model_alias(ws.engine, name, alias)
    if version is not None:
        ref = resolve_model(ws, f"{name}:{version}").ref
        production = {"model": ref, "test_accuracy": test_accuracy(ws, ref, ds)}
        log_metric("production.test_accuracy", production["test_accuracy"])
        print(f"{name}@{alias} ({ref}): test accuracy {production['test_accuracy']:.4f}", flush=True)
    evaluation = {
        "candidate": {"holdout": scores[best["model"]]},
        "production": production and {"holdout": production["test_accuracy"]},
    }
    accept, reason = decide(evaluation, margin)
    same = production is not None and (
        resolve_model(ws, best["model"]).weights_digest == resolve_model(ws, production["model"]).weights_digest
    )
    if same:  # a re-run whose best candidate is the production model's own weights
        accept, reason = False, f"{best['model']} has the weights of {production['model']} already"
    elif not accept and promote == "always":
        accept, reason = True, f"{reason}; promoted anyway (promote=always)"
    snapshots = sorted(split["snapshot_id"] for split in data["splits"].values())
    out = {"candidate": best["model"], "alias": f"{name}@{alias}", "scores": scores, "production": production}
    out.update(reason=reason, data_snapshots=snapshots)
    if accept:
        record = register_as(ws, best["model"], name, {**(lineage or {}), "data_snapshots": snapshots})
        set_alias(ws, name, alias, record.version)
        out.update(action="promoted", model=record.ref, test_accuracy=scores[best["model"]])
        print(f"promoted {best['model']} as {record.ref} to {name}@{alias}: {reason}", flush=True)
    else:
        assert production is not None  # decide accepts a first model
        out.update(action="kept", model=production["model"], test_accuracy=production["test_accuracy"])
        print(f"kept {name}@{alias} at {production['model']}, not {best['model']}: {reason}", flush=True)
    return out


@step(memoize=True)
def select(
    candidates: list,
    data: dict,
    name: str,
    alias: str = "production",
    margin: float = 0.0,
    promote: Literal["better", "always"] = "better",
) -> dict:
    """Evaluate every candidate and NAME@ALIAS on the test split, record the metrics, and make the best
    candidate NAME@ALIAS if it beats the model there by more than MARGIN (or PROMOTE is "always")."""
    ctx = current()
    lineage = {"workflow_run": ctx.run_id, "step": ctx.node_id}
    return select_model(ctx.workspace, candidates, data, name, alias, margin, promote, lineage, ctx.log_metric)


# A control step: it starts or swaps a detached service and returns, so it holds no cpu slot and
# can swap in a better model while the next candidate's gang holds the machine.
def serve_spec(best: Any, name: str, service: str, replicas: int = 1, port: int = 0) -> dict:
    """What `serve` serves, for a cluster: service SERVICE with NAME@production on REPLICAS replicas."""
    return {"service": service, "model": name, "replicas": replicas}


@step(kind="serving", spec=serve_spec, resources=Resources(cpus=0))
def serve(best: dict, name: str, service: str, replicas: int = 1, port: int = 0) -> dict:
    """Serve the chosen model as SERVICE: start it, leave it as it is, or hot-swap its model."""
    from distml.models.artifact import register_as
    from distml.serve.service import ensure_serving

    ctx = current()
    lineage = {"workflow_run": ctx.run_id, "step": ctx.node_id, "data_snapshots": best["data_snapshots"]}
    record = register_as(ctx.workspace, best["model"], name, lineage)
    served = ensure_serving(ctx.workspace, service, record.ref, {"replicas": replicas, "port": port})
    print(f"{served['action']}: {record.ref} at {served['url']}", flush=True)
    return {"url": served["url"], "model": record.ref, "service": service, "action": served["action"]}


def _accuracy(result: dict) -> float:
    return result["test_accuracy"]


def pipeline(
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    models: list[str] = list(CANDIDATES),  # noqa: B006 - never mutated; shown in --help as the default
    epochs: int = 5,
    workers: int = 2,
    batch_size: int = 64,
    serve_model: bool = True,
    async_selection: bool = False,
    name: str | None = None,
    service: str | None = None,
    replicas: int = 1,
    port: int = 0,
    margin: float = 0.0,
    promote: Literal["better", "always"] = "better",
) -> dict[str, Any]:
    """Ingest, train MODELS in parallel gangs of WORKERS, select the best, serve it: the best becomes
    production only if it beats production's test accuracy by more than MARGIN (PROMOTE="always": anyway)."""
    data = ingest(dataset, data_dir)
    trainer = train.options(resources=Resources(cpus=1, workers=workers))
    trained = trainer.map(models, data=data, epochs=epochs, workers=workers, batch_size=batch_size)
    name = name or f"{dataset}-classifier"
    chosen = select(trained, data, name=name, margin=margin, promote=promote)
    if not serve_model:
        return {"selected": chosen}
    service = service or name
    served = serve(chosen, name, service, replicas, port)
    if async_selection:  # serve the first finished candidate, swap to each better one, then to the selected
        early = serve.options(name="serve-early")(best_of(trained, key=_accuracy), name, service, replicas, port)
        served.after(early)
    return {"selected": chosen, "served": served}


def client_images(ws: Any, dataset: str, data_dir: str | None, n: int) -> tuple[Any, list[int], list[str]]:
    """`n` test images as a client sends them (28x28 pixels of 0..255), their labels and the class names."""
    import numpy as np

    from distml.data.datasets import get_dataset

    ds = get_dataset(dataset, ws, data_dir, progress=False)
    test = ds.splits["test"]
    columns = test.read_chunk(0)
    images, labels = np.asarray(columns["image"][:n]), [int(x) for x in columns["label"][:n]]
    if images.shape[1:] != (28, 28):  # digits: 8x8 pixels of 0..16, served as 28x28 of 0..255
        from PIL import Image

        images = np.stack(
            [
                np.asarray(Image.fromarray((im.astype(np.float32) * 255 / 16).astype(np.uint8)).resize((28, 28)))
                for im in images
            ]
        )
    return images.astype(np.float32), labels, list(ds.class_names)


def v2_request(images: Any) -> dict:
    return {
        "inputs": [
            {"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.reshape(-1).tolist()}
        ]
    }


def example_request(ws: Any, name: str) -> tuple[str, str]:
    """Write a V2 request with one test image for model `name`; return its path and the image's class."""
    import json
    from pathlib import Path

    from distml.core.files import atomic_write
    from distml.models.artifact import resolve_model

    record = resolve_model(ws, f"{name}@production")
    images, labels, classes = client_images(ws, record.manifest["preprocessing"]["dataset"], None, 1)
    path = service_dir(Path(ws.root).resolve(), name) / "example-request.json"
    with atomic_write(path, "w") as handle:
        json.dump(v2_request(images), handle)
    return str(path), classes[labels[0]]
