"""The `distml` command: one entry point with a verb per area, thin over the packages.

Built on click (rich for tables and progress). Every bad input surfaces as a `DistmlError`
and is printed as one `error:` line with exit status 2; nothing here holds logic of its own.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import numpy as np

from distml import __version__
from distml.errors import DistmlError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DistmlError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workspace",
    "workspace_path",
    envvar="DISTML_HOME",
    default=".distml",
    show_default=True,
    help="Workspace folder (metadata store, artifacts, caches).",
)
@click.pass_context
def main(ctx: click.Context, workspace_path: str) -> None:
    """distml: data ingestion, distributed training, serving, workflows and operations."""
    ctx.obj = {"workspace_path": workspace_path}


def _workspace(ctx: click.Context):
    from distml.workspace import Workspace

    return Workspace(ctx.obj["workspace_path"])


@main.command()
def version() -> None:
    """Print the distml version."""
    click.echo(f"distml {__version__}")


@main.group()
def data() -> None:
    """Prepare and inspect data sets."""


DATASET_OPTION = click.option("--dataset", required=True, help="fashion-mnist or digits")
DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder that already holds the data set's files (no download).",
)


@data.command("prepare")
@DATASET_OPTION
@DATA_DIR_OPTION
@click.pass_context
def data_prepare(ctx: click.Context, dataset: str, data_dir: str | None) -> None:
    """Download or locate a data set, verify it, cache it preprocessed and record it."""
    from rich.console import Console
    from rich.table import Table

    from distml.data.datasets import get_dataset
    from distml.data.loader import Loader
    from distml.ops.metadata import record_dataset

    ws = _workspace(ctx)
    ds = get_dataset(dataset, ws, data_dir, progress=True)
    table = Table(title=f"{ds.name} prepared in {ws.root}")
    for column in ("split", "records", "fingerprint", "cache", "dataset id"):
        table.add_column(column)
    for split, source in ds.splits.items():
        loader = Loader(source, batch_size=256, preprocess=ds.preprocess, cache="disk", workspace=ws, progress=True)
        loader.fill_cache()
        dataset_id = record_dataset(
            ws.engine,
            name=ds.name,
            split=split,
            fingerprint=source.fingerprint(),
            num_records=len(source),
            uri=ds.uri,
            schema={"image_shape": list(ds.image_shape), "classes": list(ds.class_names)},
        )
        table.add_row(split, str(len(source)), source.fingerprint()[:16], loader.cache_key[:16], str(dataset_id))
    Console().print(table)


@data.command("inspect")
@DATASET_OPTION
@DATA_DIR_OPTION
@click.pass_context
def data_inspect(ctx: click.Context, dataset: str, data_dir: str | None) -> None:
    """Counts per split, shape, dtype, class balance and fingerprint."""
    from rich.console import Console
    from rich.table import Table

    from distml.data.datasets import get_dataset

    ws = _workspace(ctx)
    ds = get_dataset(dataset, ws, data_dir, progress=True)
    console = Console()
    summary = Table(title=f"{ds.name} ({ds.uri})")
    for column in ("split", "records", "image shape", "dtype", "fingerprint"):
        summary.add_column(column)
    balance = Table(title="class balance")
    balance.add_column("class")
    counts_by_split: dict[str, np.ndarray] = {}
    for split, source in ds.splits.items():
        labels, first = [], None
        for chunk in source.iter_chunks(0):
            first = first or chunk
            labels.append(np.asarray(chunk["label"]))
        counts = np.bincount(np.concatenate(labels), minlength=len(ds.class_names)) if labels else np.zeros(0)
        image = first["image"] if first else np.empty((0,))
        summary.add_row(
            split, str(len(source)), "x".join(map(str, image.shape[1:])), str(image.dtype), source.fingerprint()
        )
        balance.add_column(split, justify="right")
        counts_by_split[split] = counts
    for k, name in enumerate(ds.class_names):
        balance.add_row(name, *[str(int(counts_by_split[s][k])) for s in ds.splits])
    console.print(summary)
    console.print(balance)


@main.command("train")
@click.option(
    "--model", default="cnn", show_default=True, help="cnn, dropout, batch_norm, mlp or package.module:factory"
)
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model argument (repeatable).")
@click.option("--dataset", default="digits", show_default=True, help="fashion-mnist or digits")
@DATA_DIR_OPTION
@click.option("--workers", default=2, show_default=True, type=int, help="Worker processes per node.")
@click.option(
    "--strategy", default="allreduce", show_default=True, type=click.Choice(["allreduce", "parameter-server"])
)
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Per worker.")
@click.option(
    "--lr",
    default=None,
    type=float,
    help="Learning rate for the global batch [default: 1e-3 x sqrt(global batch / 64)].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--checkpoint-every", default=50, show_default=True, type=int, help="Optimizer steps.")
@click.option("--max-restarts", default=0, show_default=True, type=int)
@click.option("--nnodes", default="1", show_default=True, help="N or MIN:MAX (elastic).")
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node).")
@click.option("--ps-shards", default=1, show_default=True, type=int, help="Parameter servers.")
@click.option("--ps-mode", default="sync", show_default=True, type=click.Choice(["sync", "async"]))
@click.option("--ps-staleness", default=None, type=int, help="Async: max steps a worker may run ahead.")
@click.option(
    "--run-id",
    default=None,
    help="Name of the run [default: derived from the settings, so the same command resumes the same run].",
)
@click.option("--metrics-port", default=None, type=int, help="Serve Prometheus metrics (0 = a free port).")
@click.option("--threads", default=None, type=int, help="Intra-op threads per worker [default: cores / workers].")
@click.option("--log-samples", is_flag=True, hidden=True, help="Log the sample ids of every step (tests).")
@click.pass_context
def train_command(ctx: click.Context, **options: Any) -> None:
    """Train a model on several workers through PyTorch's elastic launcher."""
    from distml.train.config import parse_config
    from distml.train.launcher import Stopped, launch

    model_args: dict[str, Any] = {}
    for item in options.pop("model_args"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DistmlError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            model_args[key] = json.loads(value)
        except json.JSONDecodeError:
            model_args[key] = value
    config = parse_config({**options, "model_args": model_args, "workspace": ctx.obj["workspace_path"]})
    try:
        result = launch(config)
    except (Stopped, KeyboardInterrupt) as exc:
        click.echo(
            f"stopped ({exc}); the workers checkpointed. Run the same command again to resume "
            f"run {config.resolved_run_id()}.",
            err=True,
        )
        ctx.exit(143)
    if result is None:
        click.echo(
            f"run {config.resolved_run_id()} stopped before the end; run the same command again to resume.", err=True
        )
        ctx.exit(143)
    note = " (already complete; pass --run-id to train again)" if result.get("already_complete") else ""
    click.echo(f"test accuracy {result['test_accuracy']:.4f} after {result['steps']} steps{note}")
    click.echo(f"model {result['model']} (manifest {result['manifest']})")


@main.command("serve")
@click.argument("model")
@click.option("--replicas", default=1, show_default=True, type=int, help="Replicas per shard group.")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="Scale replicas on in-flight requests.")
@click.option(
    "--target-concurrency",
    default=4.0,
    show_default=True,
    type=float,
    help="In-flight requests per replica the autoscaler aims for.",
)
@click.option("--shards", default=1, show_default=True, type=int, help="Shard groups (X-Shard-Key, scatter-gather).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port.")
@click.option("--max-batch-size", default=32, show_default=True, type=int, help="Dynamic batching: items per batch.")
@click.option(
    "--max-batch-delay-ms",
    default=0.0,
    show_default=True,
    type=float,
    help="Dynamic batching: longest wait for a batch to fill; 0 batches the requests that "
    "queue while the model runs, without waiting.",
)
@click.option("--token", envvar="DISTML_SERVE_TOKEN", default=None, help="Bearer token for all but health routes.")
@click.pass_context
def serve_command(
    ctx: click.Context,
    model: str,
    replicas: int,
    autoscale: str | None,
    target_concurrency: float,
    shards: int,
    host: str,
    port: int,
    max_batch_size: int,
    max_batch_delay_ms: float,
    token: str | None,
) -> None:
    """Serve MODEL (name, name:version or name@alias) behind a gateway; Ctrl-C drains and stops."""
    from pathlib import Path

    from distml.models.artifact import resolve_model
    from distml.serve.autoscaler import ScalingPolicy
    from distml.serve.gateway import GatewayConfig, run_gateway

    ws = _workspace(ctx)
    record = resolve_model(ws, model)  # fails here, before any process starts, on an unknown model
    pinned = f"{record.name}:{record.version}"  # replicas started later must load the same version
    policy = None
    if autoscale is not None:
        low, sep, high = autoscale.partition(":")
        if not sep or not low.isdigit() or not high.isdigit():
            raise DistmlError(f"--autoscale expects MIN:MAX replica counts such as 0:4, got {autoscale!r}")
        policy = ScalingPolicy(target_concurrency=target_concurrency, min_replicas=int(low), max_replicas=int(high))
    config = GatewayConfig(
        models=[pinned],
        workspace=str(Path(ws.root).resolve()),
        replicas=replicas,
        shards=shards,
        token=token,
        autoscale=policy,
        replica_args=["--max-batch-size", str(max_batch_size), "--max-batch-delay-ms", str(max_batch_delay_ms)],
    )
    run_gateway(config, host, port, on_ready=lambda url: click.echo(f"serving {pinned} at {url}", err=False))


@main.command("deploy")
@click.argument("model")
@click.option("--url", required=True, help="The gateway started by `distml serve`, e.g. http://127.0.0.1:8080")
@click.option(
    "--canary",
    default=0.0,
    type=click.FloatRange(0, 100),
    show_default=True,
    help="Percent of traffic for the new version; 0 switches all of it.",
)
@click.option("--promote", "action", flag_value="promote", help="Send all traffic to MODEL's version.")
@click.option("--rollback", "action", flag_value="rollback", help="Send all traffic back to MODEL's version.")
@click.option("--token", envvar="DISTML_SERVE_TOKEN", default=None)
@click.pass_context
def deploy_command(
    ctx: click.Context, model: str, url: str, canary: float, action: str | None, token: str | None
) -> None:
    """Load MODEL:VERSION into a running service without downtime; canary, promote or roll back."""
    import httpx

    from distml.models.artifact import resolve_model

    record = resolve_model(_workspace(ctx), model)
    name, version = record.name, str(record.version)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(method: str, path: str, body: Any = None) -> Any:
        try:
            response = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=300)
        except httpx.HTTPError as exc:
            raise DistmlError(f"cannot reach the gateway at {url}: {exc}") from None
        if response.status_code >= 400:
            raise DistmlError(f"gateway answered {response.status_code} to {method} {path}: {response.text[:300]}")
        return response.json()

    if action in ("promote", "rollback"):
        call("POST", f"/admin/models/{name}/promote", {"version": version})
        click.echo(f"all traffic for {name} goes to version {version}")
        return
    current = call("GET", "/admin/replicas")["groups"][0]["models"]
    old = [ref for ref in current if ref.split(":")[0].split("@")[0] == name and ref != f"{name}:{version}"]
    call(
        "POST",
        "/admin/replicas/roll",
        {"models": [f"{name}:{version}", *[r for r in current if r != f"{name}:{version}"]]},
    )
    if canary > 0 and old:
        old_version = old[0].split(":")[1]
        call("POST", f"/admin/models/{name}/traffic", {"versions": {old_version: 100 - canary, version: canary}})
        click.echo(f"{name}:{version} loaded; {canary:g}% of traffic to it, {100 - canary:g}% to version {old_version}")
    else:
        call("POST", f"/admin/models/{name}/promote", {"version": version})
        click.echo(f"{name}:{version} loaded and serving all traffic (previous versions stay loaded for rollback)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
