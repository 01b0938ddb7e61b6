"""The `distml` command: one entry point with a verb per area, thin over the packages.

Built on click (rich for tables and progress). Every bad input surfaces as a `DistmlError`
and is printed as one `error:` line with exit status 2; nothing here holds logic of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from distml import __version__
from distml.core.errors import DistmlError


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
    default=None,
    help="Workspace folder (metadata store, artifacts, caches) [default: $DISTML_HOME or .distml].",
)
@click.option(
    "--db-url",
    envvar="DISTML_DB_URL",
    default=None,
    help="Metadata store as a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
    "[default: $DISTML_DB_URL or distml.db in the workspace].",
)
@click.pass_context
def main(ctx: click.Context, workspace_path: str | None, db_url: str | None) -> None:
    """distml: data ingestion, distributed training, serving, workflows and operations."""
    ctx.obj = {"workspace_path": workspace_path, "db_url": db_url}


def _key_values(items: tuple[str, ...], flag: str) -> dict[str, Any]:
    """KEY=VALUE options: a value that parses as JSON is taken as JSON, anything else as a string."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DistmlError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


def _workspace(ctx: click.Context):
    from distml.workspace import Workspace

    return Workspace(ctx.obj["workspace_path"], ctx.obj["db_url"])


def _token(ctx: click.Context, option: str, given: str | None, path: str | None) -> str | None:
    """The token from --token-file (its first line) when given, else from --token or its variable;
    --OPTION and --OPTION-file on one command line is a mistake. An empty token means none."""
    from click.core import ParameterSource

    if path is None:
        return given or None
    if ctx.get_parameter_source(option) is ParameterSource.COMMANDLINE:
        raise DistmlError(f"give --{option} or --{option}-file, not both")
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DistmlError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise DistmlError(f"the token file {path} is empty; expected the token on its first line")
    return token


@main.command()
def version() -> None:
    """Print the distml version."""
    click.echo(f"distml {__version__}")


@main.group()
def data() -> None:
    """Prepare and inspect data sets."""


DATASET_OPTION = click.option("--dataset", required=True, help="fashion-mnist or digits")


class ConfigDefault(click.Option):
    """An option whose default is its config model's field (or its pipeline function's parameter):
    one default per setting, read from there (imported only when the command runs or shows its
    help), never a second copy here. `field` is the setting's dotted location in a model of
    sections ("parallelism.workers"); the option's name by default."""

    def __init__(self, param_decls: Any, *, config: str, field: str | None = None, **kwargs: Any):
        super().__init__(param_decls, show_default=True, **kwargs)
        self.config, self.field = config, field or self.name

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        import importlib
        import inspect

        module, _, name = self.config.partition(":")
        source = getattr(importlib.import_module(module), name)
        if hasattr(source, "model_fields"):  # a pydantic config model
            return model_field(source, self.field).get_default(call_default_factory=True)
        return inspect.signature(source).parameters[self.field].default  # a pipeline's parameter


def model_field(model: Any, location: str) -> Any:
    """The pydantic field at a dotted location ("parallelism.workers") of a model of sections."""
    *sections, name = location.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name]


def _put(values: dict[str, Any], location: str, value: Any) -> None:
    """Set `value` at a dotted location of nested config values."""
    *sections, name = location.split(".")
    for section in sections:
        values = values.setdefault(section, {})
    values[name] = value


def config_values(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Take the values of the command's ConfigDefault flags out of `options`, each at its field's
    dotted location: the nested values of the config those flags set."""
    values: dict[str, Any] = {}
    for param in ctx.command.params:
        if isinstance(param, ConfigDefault) and param.name in options:
            _put(values, param.field, options.pop(param.name))
    return values


def config_option(config: str) -> Any:
    """`@option(...)` for the flags of one config model: `click.option` with `ConfigDefault`."""

    def option(*decls: str, field: str | None = None, **kwargs: Any) -> Any:
        return click.option(*decls, cls=ConfigDefault, config=config, field=field, **kwargs)

    return option


train_option = config_option("distml.train.config:TrainConfig")
watch_option = config_option("distml.pipelines.continuous:WatchConfig")
canary_option = config_option("distml.serve.canary:CanaryPolicy")
end_to_end_option = config_option("distml.pipelines.end_to_end:pipeline")


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

    from distml.data.datasets import prepare_dataset

    ws = _workspace(ctx)
    rows = prepare_dataset(dataset, ws, data_dir)
    table = Table(title=f"{dataset} prepared in {ws.root}")
    for column in ("split", "records", "fingerprint", "cache", "dataset id"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["split"], str(row["records"]), row["fingerprint"][:16], row["cache_key"][:16], str(row["snapshot_id"])
        )
    Console().print(table)


@data.command("inspect")
@DATASET_OPTION
@DATA_DIR_OPTION
@click.pass_context
def data_inspect(ctx: click.Context, dataset: str, data_dir: str | None) -> None:
    """Counts per split, shape, dtype, class balance and fingerprint."""
    import numpy as np
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
    counts_by_split: dict[str, Any] = {}
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


QUEUE_OPTION = click.option(
    "--queue", default="default", show_default=True, help="Scheduler queue to wait in (see `distml queue`)."
)
PRIORITY_OPTION = click.option(
    "--priority", default="normal", show_default=True, help="low, normal, high or an integer; higher may preempt lower."
)


@main.group("queue", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.pass_context
def queue_group(ctx: click.Context, as_json: bool) -> None:
    """Queues, shares, running and waiting jobs of this machine's pool, and why each waits."""
    if ctx.invoked_subcommand is not None:
        return
    from distml.scheduling.admission import schedule_pass, snapshot

    engine = _workspace(ctx).engine
    schedule_pass(engine)  # reclaims dead holders' gangs and brings every reason up to date
    state = snapshot(engine)
    if as_json:
        click.echo(json.dumps(state, indent=1, default=str))
        return
    _print_queue(state)


def _print_queue(state: dict[str, Any]) -> None:
    from rich.console import Console

    from distml.views.top import queue_view

    console = Console()
    for part in queue_view(state):
        console.print(part)


@queue_group.command("set")
@click.argument("name")
@click.option("--weight", required=True, type=float, help="Its nominal share is weight / sum of all weights.")
@click.pass_context
def queue_set(ctx: click.Context, name: str, weight: float) -> None:
    """Create queue NAME or change its weight."""
    from distml.scheduling.admission import set_queue

    set_queue(_workspace(ctx).engine, name, weight)
    click.echo(f"queue {name}: weight {weight:g}")


@queue_group.command("pool")
@click.option("--cpus", type=float, default=None, help="Cpu slots this machine offers [default: its cores].")
@click.option("--gpus", type=int, default=None, help="Gpus this machine offers [default: those visible].")
@click.option("--memory", "memory_gb", type=float, default=None, help="GiB of memory this machine offers.")
@click.pass_context
def queue_pool(ctx: click.Context, cpus: float | None, gpus: int | None, memory_gb: float | None) -> None:
    """Show or change what this machine offers the scheduler."""
    from distml.scheduling.admission import ensure_node, set_node

    engine = _workspace(ctx).engine
    node = (
        ensure_node(engine)
        if cpus is gpus is memory_gb is None
        else set_node(engine, cpus=cpus, gpus=gpus, memory_gb=memory_gb)
    )
    click.echo(f"pool {node.name}: {node.cpus:g} cpu slots, {node.gpus} gpus, {node.memory_gb:g} GiB")


@main.command("train")
@train_option("--model", field="model.name", help="cnn, dropout, batch_norm, mlp or package.module:factory")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model argument (repeatable).")
@train_option("--dataset", field="data.dataset", help="fashion-mnist or digits")
@DATA_DIR_OPTION
@click.option(
    "--train-file",
    "train_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Train on this .npz (image, label; raw pixels like the data set's) instead of its train split (repeatable).",
)
@train_option(
    "--init-from", field="model.init_from", metavar="NAME:VERSION", help="Warm start: begin from this model's weights."
)
@train_option("--workers", field="parallelism.workers", type=int, help="Worker processes per node.")
@train_option("--strategy", field="parallelism.strategy", type=click.Choice(["allreduce", "parameter-server"]))
@train_option("--epochs", field="training.epochs", type=int)
@train_option("--max-steps", field="training.max_steps", type=int, help="Stop after this many optimizer steps.")
@train_option("--batch-size", field="data.batch_size", type=int, help="Per worker.")
@train_option(
    "--lr",
    field="optimizer.lr",
    type=float,
    help="Learning rate for the global batch [default: 1e-3 x sqrt(global batch / 64)].",
)
@train_option(
    "--optimizer",
    field="optimizer.name",
    type=click.Choice(["adam", "sgd"]),
    help="adam (fused) or plain sgd (needs --lr).",
)
@train_option("--seed", field="training.seed", type=int)
@train_option("--device", field="training.device", type=click.Choice(["auto", "cpu", "cuda"]))
@train_option("--checkpoint-every", field="checkpoint.every", type=int, help="Optimizer steps.")
@train_option("--max-restarts", field="checkpoint.max_restarts", type=int)
@train_option("--nnodes", field="parallelism.nnodes", help="N or MIN:MAX (elastic).")
@train_option(
    "--rdzv-endpoint", field="parallelism.rdzv_endpoint", help="HOST:PORT of the c10d rendezvous (multi-node)."
)
@train_option(
    "--rdzv-last-call",
    "rdzv_last_call_timeout",
    field="parallelism.rdzv_last_call_timeout",
    type=int,
    help="Elastic: seconds a rendezvous that has its minimum of nodes waits for more.",
)
@train_option(
    "--rdzv-keep-alive",
    field="parallelism.rdzv_keep_alive",
    type=int,
    help="Elastic: seconds between a node's heartbeats; a node that misses 3 is dropped.",
)
@train_option("--ps-shards", field="parallelism.ps_shards", type=int, help="Parameter servers.")
@train_option("--ps-mode", field="parallelism.ps_mode", type=click.Choice(["sync", "async"]))
@train_option(
    "--ps-staleness", field="parallelism.ps_staleness", type=int, help="Async: max steps a worker may run ahead."
)
@train_option(
    "--run-id",
    field="job.run_id",
    help="Name of the run [default: derived from the settings, so the same command resumes the same run].",
)
@train_option("--metrics-port", field="job.metrics_port", type=int, help="Serve Prometheus metrics (0 = a free port).")
@train_option(
    "--threads", field="training.threads", type=int, help="Intra-op threads per worker [default: cores / workers]."
)
@train_option(
    "--log-samples",
    field="training.log_samples",
    is_flag=True,
    hidden=True,
    help="Log the sample ids of every step (tests).",
)
@train_option("--queue", field="job.queue", help="Scheduler queue to wait in (see `distml queue`).")
@train_option("--priority", field="job.priority", help="low, normal, high or an integer; higher may preempt lower.")
@click.pass_context
def train_command(ctx: click.Context, **options: Any) -> None:
    """Train a model on several workers through PyTorch's elastic launcher."""
    from distml.train.config import parse_config
    from distml.train.launcher import Stopped, launch

    values = config_values(ctx, options)  # every flag with its setting's location and default
    _put(values, "model.args", _key_values(options.pop("model_args"), "--model-arg"))
    _put(values, "data.train_files", [str(Path(p).resolve()) for p in options.pop("train_files")] or None)
    _put(values, "data.data_dir", options.pop("data_dir"))
    values["workspace"] = _workspace(ctx).ref
    config = parse_config(values)
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
@click.option("--replicas", default=None, type=int, help="Replicas per shard group [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="Scale replicas on in-flight requests.")
@click.option(
    "--target-concurrency",
    default=None,
    type=float,
    help="Autoscaling: in-flight requests per replica to aim for [default: 4].",
)
@click.option("--stable-window", default=None, type=float, help="Autoscaling: seconds averaged to scale down [60].")
@click.option("--panic-window", default=None, type=float, help="Autoscaling: seconds averaged to panic [6].")
@click.option(
    "--scale-to-zero-after",
    default=None,
    type=float,
    help="Autoscaling with MIN 0: idle seconds before the last replica stops [30].",
)
@click.option("--shards", default=None, type=int, help="Shard groups (X-Shard-Key, scatter-gather) [default: 1].")
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", default=None, type=int, help="Port; 0 picks a free one [default: 8080].")
@click.option(
    "--max-batch-size",
    default=None,
    type=int,
    help="Dynamic batching: items per forward pass; 1 turns batching off [default: 32].",
)
@click.option(
    "--max-batch-delay-ms",
    default=None,
    type=float,
    help="Dynamic batching: longest wait for a batch to fill; 0 batches the requests that "
    "queue while the model runs, without waiting [default: 0].",
)
@click.option(
    "--hold-timeout",
    default=None,
    type=float,
    help="Seconds a request waits for a ready replica (cold start) before a 503 [default: 60].",
)
@click.option(
    "--seed",
    default=None,
    type=int,
    help="Seed of the gateway's weighted draw of a version for each request of a traffic split (canary): "
    "the same requests get the same versions [default: unseeded].",
)
@click.option("--name", default=None, help="Service name; its folder is WORKSPACE/services/NAME [default: MODEL-PID].")
@click.option(
    "--replica-cpus",
    default=None,
    type=float,
    help="Cpu slots the scheduler reserves per replica (priority class serving) [default: 0, registered only].",
)
@click.option("--queue", default=None, help="Scheduler queue the replicas ask in [default: default].")
@click.option(
    "--token",
    envvar="DISTML_SERVE_TOKEN",
    default=None,
    help="Bearer token for all but the health routes. Prefer $DISTML_SERVE_TOKEN or --token-file: "
    "a command line is visible to other users (ps).",
)
@click.option(
    "--token-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Read the bearer token from this file (its first line).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a --host other than loopback without a token (when a firewall or network policy guards it).",
)
@click.pass_context
def serve_command(ctx: click.Context, model: str, **options: Any) -> None:
    """Serve MODEL (name, name:version or name@alias) behind a gateway; Ctrl-C drains and stops.

    With a token, every route but health needs `Authorization: Bearer TOKEN`; a --host other than
    loopback (127.0.0.1, localhost) is refused without one unless --insecure is given."""
    import os

    from distml.core.exposure import check_exposure
    from distml.core.files import atomic_write
    from distml.core.layout import ServiceRecord
    from distml.serve.gateway import run_gateway
    from distml.serve.service import build_serve_config

    options["token"] = _token(ctx, "token", options["token"], options.pop("token_file"))
    check_exposure(options["host"] or "127.0.0.1", options["token"], options["insecure"])  # before any file
    config, pinned = build_serve_config(_workspace(ctx), model, options)
    path = config.service_dir() / "config.json"
    with atomic_write(path, "w") as handle:
        handle.write(config.model_dump_json(indent=1))
    ws_root = config.replica.workspace.root
    mine: list[ServiceRecord] = []

    def ready(url: str) -> None:
        click.echo(f"serving {pinned} at {url}")
        # recorded as detached services are, for `distml top`, unless another gateway lives there
        other = ServiceRecord.read(ws_root, config.name)
        if other is None or other.pid == os.getpid():
            mine.append(ServiceRecord.for_this_process(config.name, url, pinned))
            mine[-1].write(ws_root)

    try:
        run_gateway(config, on_ready=ready)
    finally:
        for record in mine:
            record.forget(ws_root)


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
    from distml.models.artifact import resolve_model
    from distml.serve.admin import GatewayAdmin

    record = resolve_model(_workspace(ctx), model)
    name, version = record.name, record.version
    with GatewayAdmin(url, token) as admin:
        if action in ("promote", "rollback"):
            admin.promote(name, version)
            click.echo(f"all traffic for {name} goes to version {version}")
            return
        done = admin.deploy(name, version, canary)
    if done.previous is not None:
        click.echo(
            f"{name}:{version} loaded; {canary:g}% of traffic to it, {100 - canary:g}% to version {done.previous}"
        )
    else:
        click.echo(f"{name}:{version} loaded and serving all traffic (previous versions stay loaded for rollback)")


@main.group("services", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the services as a JSON list.")
@click.option("--token", envvar="DISTML_SERVE_TOKEN", default=None, help="Bearer token of the services' gateways.")
@click.pass_context
def services_group(ctx: click.Context, as_json: bool, token: str | None) -> None:
    """The services of this workspace (`distml run`'s, `distml serve`'s): list, stop, logs.

    With no subcommand, lists them (same as `distml services list`).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(services_list, as_json=as_json, token=token)


@services_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the services as a JSON list.")
@click.option("--token", envvar="DISTML_SERVE_TOKEN", default=None, help="Bearer token of the services' gateways.")
@click.pass_context
def services_list(ctx: click.Context, as_json: bool = False, token: str | None = None) -> None:
    """Each service: URL, model versions and traffic split, replicas ready/desired, and its state
    (running, or gone when its gateway's process died)."""
    from dataclasses import asdict

    from rich.console import Console

    from distml.serve.service import list_services
    from distml.views.services import services_table

    ws = _workspace(ctx)
    services = list_services(ws, token)
    if as_json:
        click.echo(json.dumps([asdict(service) for service in services], indent=1))
        return
    if not services:
        click.echo(f"no services in {ws.root}; `distml serve` or `distml run` starts one")
        return
    table, width = services_table(services)
    console = Console()
    if console.width < width:  # a narrow terminal or $COLUMNS: longer lines, never a cut name or URL
        console = Console(width=width)
    console.print(table)


@services_group.command("stop")
@click.argument("name")
@click.pass_context
def services_stop(ctx: click.Context, name: str) -> None:
    """Stop service NAME: its gateway drains, stops its replicas and exits. A gone service's stale
    record is removed."""
    from distml.serve.service import find_service, stop_service

    ws = _workspace(ctx)
    record = find_service(ws, name)
    if stop_service(ws, name):
        click.echo(f"stopped service {name} (gateway pid {record.pid} at {record.url})")
    else:
        click.echo(f"service {name} was gone (its gateway, pid {record.pid}, had died); removed its stale record")


@services_group.command("logs")
@click.argument("name")
@click.option(
    "--replica",
    default=None,
    metavar="N|ID",
    help="Replica N's log (N of the first shard group, or a replica id such as g1-0) instead of the gateway's.",
)
@click.pass_context
def services_logs(ctx: click.Context, name: str, replica: str | None) -> None:
    """Print the log of service NAME's gateway, or of one of its replicas (a stopped service's too)."""
    from distml.serve.service import service_logs

    path = service_logs(_workspace(ctx), name, replica)
    click.echo(path.read_text(errors="replace"), nl=False)


@main.command("run")
@click.argument("target", required=False)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Pipeline parameter (repeatable).")
@click.option("--dataset", default=None, help="The end-to-end pipeline's data set: fashion-mnist (default) or digits.")
@DATA_DIR_OPTION
@click.option(
    "--epochs", default=None, type=int, help="The pipeline's `epochs` parameter [default: the pipeline's own]."
)
@click.option("--no-serve", is_flag=True, help="The end-to-end pipeline: stop after registering the best model.")
@click.option("--async-selection", is_flag=True, help="Serve the first trained model, swap to better ones.")
@end_to_end_option(
    "--margin", type=float, help="The end-to-end pipeline: test accuracy the best candidate must gain over production."
)
@end_to_end_option(
    "--promote",
    type=click.Choice(["better", "always"]),
    help="The end-to-end pipeline: make the best candidate production only if better, or always.",
)
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID", help="Continue a stopped or killed run.")
@click.option(
    "--refresh",
    multiple=True,
    is_flag=False,
    flag_value="*",
    metavar="[STEP]",
    help="Run memoized steps again (all of them, or the named step; repeatable).",
)
@click.option("--continue-on-failure", is_flag=True, help="Run what does not depend on a failed step.")
@click.option("--cpus", default=None, type=float, help="At most this many cpu slots for this run's steps at once.")
@QUEUE_OPTION
@PRIORITY_OPTION
@click.pass_context
def run_command(ctx: click.Context, target: str | None, **options: Any) -> None:
    """Run a pipeline (default: ingest, train three CNNs, select, serve); PATH.py:FUNCTION runs yours."""
    from distml.workflow.orchestrator import RunOptions

    if options["resume_id"]:
        if target or options["params"]:
            raise DistmlError("--resume continues a run with its own pipeline and parameters; pass only the run id")
        result = _run_pipeline(ctx, resume_id=options["resume_id"])
    else:
        params = {k.replace("-", "_"): v for k, v in _key_values(options["params"], "--param").items()}
        flags: dict[str, str] = {}  # parameter -> the flag that set it, for a pipeline without it
        for flag, key in (("dataset", "dataset"), ("data_dir", "data_dir"), ("epochs", "epochs")):
            if options[flag] is not None:
                params[key], flags[key] = options[flag], "--" + flag.replace("_", "-")
        if options["no_serve"]:
            params["serve_model"], flags["serve_model"] = False, "--no-serve"
        if options["async_selection"]:
            params["async_selection"], flags["async_selection"] = True, "--async-selection"
        for key in ("margin", "promote"):  # their defaults are the pipeline's: passed only when given
            if ctx.get_parameter_source(key) is not click.core.ParameterSource.DEFAULT:
                params[key], flags[key] = options[key], f"--{key}"
        refresh = set(options["refresh"])
        run_options = RunOptions(
            refresh=True if "*" in refresh else frozenset(refresh),
            fail_fast=not options["continue_on_failure"],
            cpus=options["cpus"],
            queue=options["queue"],
            priority=options["priority"],
        )
        result = _run_pipeline(ctx, target, params, run_options, flags=flags)
    selected = result.result.get("selected") if isinstance(result.result, dict) else None
    if isinstance(selected, dict) and "action" in selected:
        click.echo(f"{selected['alias']} {selected['action']} {selected['model']}: {selected['reason']}")
    served = result.result.get("served") if isinstance(result.result, dict) else None
    if isinstance(served, dict) and "url" in served:
        from distml.core.refs import ModelRef
        from distml.pipelines.end_to_end import example_request

        name = ModelRef.parse(served["model"]).name
        body_path, label = example_request(_workspace(ctx), name)
        click.echo(f"serving {served['model']} at {served['url']} ({served['action']})")
        click.echo(
            f"try it (a test image of class {label!r}):\n  curl -s {served['url']}/v2/models/{name}/infer "
            f"-H 'Content-Type: application/json' -d @{body_path}"
        )
    elif result.result is not None:
        click.echo(json.dumps(result.result, indent=1, default=str))


def _check_flags(target: Any, flags: dict[str, str]) -> None:
    import inspect

    accepted = inspect.signature(target.function).parameters
    for key, flag in flags.items():
        if key not in accepted:
            takes = ", ".join(accepted) or "no parameters"
            raise DistmlError(
                f"{flag} sets a pipeline's `{key}` parameter, which {target.spec} does not have; "
                f"it takes {takes} (set those with --param KEY=VALUE)"
            )


def _run_pipeline(
    ctx: click.Context,
    target: str | None = None,
    params: dict[str, Any] | None = None,
    options: Any = None,
    resume_id: str | None = None,
    flags: dict[str, str] | None = None,
) -> Any:
    """Run (or resume) a pipeline with the live view; exit 1 if it fails, 130 if stopped. `flags`
    names the flag that set each of `params` that has one (--epochs...): they go only to a
    pipeline that declares that parameter; any other pipeline's parameters are set with --param."""
    from rich.console import Console

    from distml.workflow.orchestrator import new_run_id, resume_run, run_pipeline
    from distml.workflow.target import DEFAULT_TARGET, load_target
    from distml.workflow.view import LiveView

    ws = _workspace(ctx)
    if resume_id is None:
        pipeline = load_target(target or DEFAULT_TARGET)
        _check_flags(pipeline, flags or {})
        run_id = new_run_id(pipeline.name)
    else:
        run_id = resume_id
    with LiveView(Console(), "run") as view:

        def started(orchestrator: Any) -> None:  # the run is recorded: it can be resumed from now on
            what = "resumed" if resume_id else "started"
            view.console.print(
                f"run {run_id} {what}; if it stops, continue it with: distml run --resume {run_id}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

        try:
            if resume_id is None:
                result = run_pipeline(ws, pipeline, params, options, run_id=run_id, on_start=started, on_change=view)
            else:
                result = resume_run(ws, run_id, on_start=started, on_change=view)
        except KeyboardInterrupt:
            view.__exit__(None, None, None)
            click.echo(f"stopped; continue with: distml run --resume {run_id}", err=True)
            ctx.exit(130)
    if result.status != "succeeded":
        click.echo(f"run {result.run_id} failed; see: distml runs show {result.run_id}", err=True)
        ctx.exit(1)
    click.echo(f"run {result.run_id} succeeded")
    return result


@main.command("demo")
@click.option("--dataset", default="digits", show_default=True, help="digits (offline) or fashion-mnist.")
@DATA_DIR_OPTION
@end_to_end_option("--epochs", type=int, help="Epochs per candidate.")
@click.option("--requests", "count", default=8, show_default=True, type=int, help="Test images to send.")
@click.option("--keep-serving", is_flag=True, help="Leave the service running at the end.")
@click.pass_context
def demo_command(ctx: click.Context, dataset: str, data_dir: str | None, epochs: int, count: int, keep_serving: bool):
    """The main job end to end: run the pipeline, ask the served model about test images, stop it."""
    from rich.console import Console

    from distml.pipelines.demo import answer_table
    from distml.serve.service import stop_service

    params = {"dataset": dataset, "data_dir": data_dir, "epochs": epochs}
    result = _run_pipeline(ctx, None, params)
    served, selected = result.result["served"], result.result["selected"]
    scores = ", ".join(f"{ref} {acc:.3f}" for ref, acc in sorted(selected["scores"].items(), key=lambda kv: -kv[1]))
    click.echo(f"test accuracy of the candidates: {scores}; {selected['candidate']} is the best")
    click.echo(f"{selected['alias']} {selected['action']} {selected['model']}: {selected['reason']}")
    ws = _workspace(ctx)
    try:
        Console().print(answer_table(ws, served["url"], served["model"], dataset, data_dir, count))
    finally:
        if keep_serving:
            click.echo(f"still serving {served['model']} at {served['url']}; stop it with kill {served.get('pid', '')}")
        else:
            stop_service(ws, served["service"])
            click.echo(f"stopped the service {served['service']} (pass --keep-serving to leave it up)")


@main.command("watch")
@click.option("--source", required=True, help="A folder new files arrive in, or a SQLAlchemy URL (with --table).")
@click.option("--table", default=None, help="SQL source: the table new rows arrive in.")
@click.option("--order-column", default=None, help="SQL source: an increasing id or timestamp column.")
@click.option("--name", default=None, help="Watch and registered model name [default: <dataset>-continuous].")
@watch_option("--dataset", help="Schema, preprocessing and holdout of the data.")
@DATA_DIR_OPTION
@watch_option("--model")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model argument (repeatable).")
@watch_option("--epochs", type=int)
@watch_option("--workers", type=int, help="Training workers per candidate.")
@watch_option("--batch-size", type=int)
@click.option("--warm-start/--cold-start", default=False, show_default=True, help="Start from production's weights.")
@watch_option("--margin", type=float, help="Holdout accuracy a candidate must gain.")
@click.option("--service", default=None, help="Service name [default: the watch name].")
@watch_option("--replicas", type=int)
@watch_option("--port", type=int, help="Gateway port (0: a free one).")
@canary_option("--canary-weight", field="weight", type=float, help="Canary's share of requests.")
@canary_option("--canary-window", field="window_s", type=float, help="Seconds before promotion.")
@canary_option("--canary-min-requests", field="min_requests", type=int)
@canary_option("--max-error-rate-increase", type=float)
@canary_option("--max-p99-ratio", type=float)
@watch_option(
    "--poll", "poll_s", type=float, help="Seconds between polls where no filesystem events come (NFS, no inotify)."
)
@click.option("--max-cycles", default=None, type=int, help="Stop after this many cycles.")
@click.pass_context
def watch_command(ctx: click.Context, **options: Any) -> None:
    """Train and serve continuously: each arrival of new data triggers a cycle (train, evaluate,
    promote through a canary); data arriving during a cycle waits for the next one."""
    import signal
    import threading

    from distml.pipelines.continuous import Watcher, parse_watch_config

    canary = {
        "weight": options.pop("canary_weight"),
        "window_s": options.pop("canary_window"),
        "min_requests": options.pop("canary_min_requests"),
        "max_error_rate_increase": options.pop("max_error_rate_increase"),
        "max_p99_ratio": options.pop("max_p99_ratio"),
    }
    options["model_args"] = _key_values(options.pop("model_args"), "--model-arg")
    if options["name"] is None:
        options["name"] = f"{options['dataset']}-continuous"
    ws = _workspace(ctx)
    config = parse_watch_config({**options, "canary": canary, "workspace": str(ws.root)})
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Watcher(ws, config, say=lambda line: click.echo(f"[watch] {line}")).run(stop)


@main.command("cycles")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def cycles_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """The cycles of watch NAME: new data, candidate, holdout accuracy, decision and why, freshness."""
    from rich.console import Console

    from distml.pipelines.continuous import cycle_rows, cycles_table
    from distml.pipelines.watches import get_watch

    engine = _workspace(ctx).engine
    if get_watch(engine, name) is None:
        raise DistmlError(f"no watch {name!r} in this workspace; start one with distml watch --name {name}")
    rows = cycle_rows(engine, name)
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
    else:
        Console().print(cycles_table(rows, f"watch {name}"))


@main.command("demo-continuous")
@click.option(
    "--dataset",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "digits", "fashion-mnist"]),
    help="auto: Fashion-MNIST when its files are in the workspace or --data-dir, else digits (offline).",
)
@DATA_DIR_OPTION
@click.option("--waves", default=3, show_default=True, type=int, help="Arrival waves the training data is cut into.")
@click.option("--epochs", default=2, show_default=True, type=int, help="Epochs per cycle (warm-started).")
@click.pass_context
def demo_continuous_command(ctx: click.Context, dataset: str, data_dir: str | None, waves: int, epochs: int) -> None:
    """Continuous training end to end: data arrives in waves under a steady request load."""
    from rich.console import Console

    from distml.data.datasets import FASHION_MNIST_FILES
    from distml.data.download import locate_files
    from distml.pipelines.demo_continuous import run_demo

    ws = _workspace(ctx)
    if dataset == "auto":
        try:
            locate_files(FASHION_MNIST_FILES, Path(data_dir) if data_dir else Path(ws.datasets_dir) / "fashion-mnist")
            dataset = "fashion-mnist"
        except DistmlError:
            dataset = "digits"
    if waves < 2:
        raise DistmlError(f"--waves must be at least 2 (one to start the service, one to swap), got {waves}")
    Console().print(run_demo(ws, dataset, data_dir, waves, epochs, echo=click.echo))


@main.group("runs", invoke_without_command=True)
@click.pass_context
def runs_group(ctx: click.Context) -> None:
    """List workflow runs; `distml runs show RUN_ID` draws one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(runs_list)


@runs_group.command("list")
@click.option("--limit", default=20, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as a JSON list.")
@click.pass_context
def runs_list(ctx: click.Context, limit: int = 20, as_json: bool = False) -> None:
    """The latest runs, newest first: id (always whole), state, start, target, steps by state."""
    from rich.console import Console

    from distml.workflow.store import list_workflow_runs
    from distml.workflow.view import run_record, runs_table

    runs = list_workflow_runs(_workspace(ctx).engine, limit)
    if as_json:
        click.echo(json.dumps([run_record(run) for run in runs], indent=1))
        return
    if not runs:
        click.echo("no workflow runs yet; start one with `distml run`")
        return
    table, width = runs_table(runs)
    console = Console()
    if console.width < width:  # a narrow terminal or $COLUMNS: longer lines, never a cut run id
        console = Console(width=width)
    console.print(table)


@runs_group.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run and each step execution as JSON.")
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """The run's DAG as a tree: state, duration, cache hit or miss and why, resources; errors with log tails."""
    import time

    from rich.console import Console

    from distml.workflow.store import get_workflow_run, list_step_executions
    from distml.workflow.view import run_detail, run_view

    engine = _workspace(ctx).engine
    run = get_workflow_run(engine, run_id)
    if run is None:
        raise DistmlError(f"no workflow run {run_id!r}; `distml runs` lists them")
    executions = list_step_executions(engine, run_id)
    if as_json:
        click.echo(json.dumps(run_detail(run, executions), indent=1))
        return
    Console().print(run_view(run, executions, time.time()))


@main.command("logs")
@click.argument("run_id")
@click.argument("step")
@click.pass_context
def logs_command(ctx: click.Context, run_id: str, step: str) -> None:
    """Print the captured stdout/stderr of STEP (a node id such as train[cnn]) in RUN_ID."""
    from distml.workflow.logs import step_logs

    logs = step_logs(_workspace(ctx).engine, run_id, step)
    if logs.cached:
        click.echo(f"# {step} was a cache hit in {run_id}; this is the log of the execution it reused", err=True)
    click.echo(logs.read(), nl=False)


@main.group("models", invoke_without_command=True)
@click.pass_context
def models_group(ctx: click.Context) -> None:
    """List registered models and point aliases (such as champion) at their versions.

    With no subcommand, lists every registered version (same as `distml models list`).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-4 <= abs(value) < 1e4 else f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


@models_group.command("list")
@click.argument("name", required=False)
@click.pass_context
def models_list(ctx: click.Context, name: str | None = None) -> None:
    """Registered versions of every model, or of NAME: version, created, metrics, aliases."""

    from rich.console import Console
    from rich.table import Table

    from distml.models.artifact import list_models

    ws = _workspace(ctx)
    rows = list_models(ws, name)
    if not rows:
        if name is None:
            click.echo(f"no models are registered in {ws.root}; `distml train` registers one")
            return
        names = sorted({row.name for row in list_models(ws)})
        known = "registered models: " + ", ".join(names) if names else "no models are registered yet"
        raise DistmlError(f"no model named {name!r} is registered; {known}")
    table = Table(title=f"models in {ws.root}")
    for column in ("name", "version", "created (UTC)", "metrics", "aliases"):
        table.add_column(column, justify="right" if column == "version" else "left")
    for row in rows:
        table.add_row(
            row.name,
            str(row.version),
            row.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            " ".join(f"{key}={_format_metric(value)}" for key, value in sorted(row.metrics.items())),
            ", ".join(row.aliases),
        )
    Console().print(table)


@models_group.command("alias")
@click.argument("model", metavar="MODEL[:VERSION]")
@click.argument("alias")
@click.option("--unset", is_flag=True, help="Remove ALIAS instead of setting it.")
@click.pass_context
def models_alias(ctx: click.Context, model: str, alias: str, unset: bool) -> None:
    """Point MODEL@ALIAS at MODEL:VERSION, e.g. `distml models alias cnn:2 champion`.

    MODEL alone means its latest version. With --unset the alias is removed: MODEL alone
    removes it whatever version it points at, MODEL:VERSION only if it points at that version.
    `distml serve MODEL@ALIAS` then serves the version the alias points at.
    """
    from distml.core.refs import ModelRef
    from distml.models.artifact import list_models, set_alias, unset_alias
    from distml.models.registry import get_model_alias

    ref = ModelRef.parse(model)
    if ref.alias is not None or ref.digest is not None:
        raise DistmlError(
            f"model reference {model!r} is not valid here; expected MODEL or MODEL:VERSION with a positive "
            "integer version, e.g. cnn or cnn:2"
        )
    name, version = ref.name, ref.version
    ws = _workspace(ctx)
    if unset:
        removed = unset_alias(ws, name, alias, version)
        click.echo(f"removed {name}@{alias} (it pointed at {name}:{removed})")
        return
    if version is None:
        rows = list_models(ws, name)
        # No versions: set_alias names the real problem (an invalid or unregistered name).
        version = rows[0].version if rows else 1
    previous = get_model_alias(ws.engine, name, alias)
    set_alias(ws, name, alias, version)
    moved = f" (moved from {name}:{previous})" if previous is not None and previous != version else ""
    click.echo(f"{name}@{alias} -> {name}:{version}{moved}")


@main.command("top")
@click.option("--once", is_flag=True, help="Print one frame (after one interval, so rates are known) and exit.")
@click.option(
    "--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 3600), help="Seconds between refreshes."
)
@click.option("--token", envvar="DISTML_SERVE_TOKEN", default=None, help="Bearer token of the services' gateways.")
@click.pass_context
def top_command(ctx: click.Context, once: bool, interval: float, token: str | None) -> None:
    """Live view of queues, training runs, pipeline runs and services (Ctrl-C quits)."""
    from distml.views.top import run_top

    run_top(_workspace(ctx), once=once, interval=interval, token=token)


@main.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", default=8265, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one).")
@click.option(
    "--token",
    envvar="DISTML_UI_TOKEN",
    default=None,
    help="Token every page, API and action needs (a browser signs in once). Prefer $DISTML_UI_TOKEN or "
    "--token-file: a command line is visible to other users (ps).",
)
@click.option(
    "--token-file", default=None, type=click.Path(dir_okay=False), help="Read the token from this file (first line)."
)
@click.option("--read-only", is_flag=True, help="Refuse every action (resume, cancel, aliases, canaries, scaling).")
@click.option(
    "--serve-token", envvar="DISTML_SERVE_TOKEN", default=None, help="Bearer token of the services' gateways."
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a --host other than loopback without --token (when a firewall or network policy guards it).",
)
@click.pass_context
def ui_command(
    ctx: click.Context,
    host: str,
    port: int,
    token: str | None,
    token_file: str | None,
    read_only: bool,
    serve_token: str | None,
    insecure: bool,
) -> None:
    """The workspace in a browser: runs and their DAGs, training, models and lineage, services, queues, watches.

    With a token, everything but /health needs it; a --host other than loopback is refused without
    one unless --insecure is given."""
    from distml.ui.app import check_ui_exposure, serve_ui

    token = _token(ctx, "token", token, token_file)
    check_ui_exposure(host, token, insecure, read_only)  # before the workspace is opened
    serve_ui(
        _workspace(ctx),
        host,
        port,
        token,
        read_only,
        serve_token,
        echo=lambda line: click.echo(line),
        insecure=insecure,
    )


@main.command("lineage")
@click.argument("model", required=False, metavar="MODEL[:VERSION|@ALIAS]")
@click.option("--data", "fingerprint", default=None, metavar="FINGERPRINT", help="A data snapshot (unique prefix ok).")
@click.option("--json", "as_json", is_flag=True, help="Print the lineage as JSON.")
@click.pass_context
def lineage_command(ctx: click.Context, model: str | None, fingerprint: str | None, as_json: bool) -> None:
    """Where MODEL came from (data snapshots, training run, parameters, code, workflow steps) and
    where it went (deployments, what serves it now); with --data, everything trained from a snapshot."""
    from distml.views import lineage

    if model is not None and fingerprint is not None:
        raise DistmlError("give either a model or --data FINGERPRINT, not both")
    if model is None and fingerprint is None:
        raise DistmlError("give a model (MODEL, MODEL:VERSION or MODEL@ALIAS) or --data FINGERPRINT")
    engine = _workspace(ctx).engine
    view = lineage.model_lineage(engine, model) if model is not None else lineage.data_lineage(engine, fingerprint)
    if as_json:
        click.echo(json.dumps(view, indent=1, default=str))
        return
    from rich.console import Console

    Console().print(lineage.render_model(view) if model is not None else lineage.render_data(view))


@main.group("export")
def export_group() -> None:
    """Hand the pipeline to a cluster's engines (Kubernetes manifests)."""


@export_group.command("k8s")
@click.argument("target", required=False)
@click.option("--image", required=True, help="The image built from the generated Dockerfile.")
@click.option("--namespace", required=True, help="Namespace of the pipeline's objects.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="The kustomize folder to write.")
@click.option("--queue", default="default", show_default=True, help="Queue the training jobs wait in.")
@click.option("--trainer", type=click.Choice(["pytorchjob", "trainjob"]), default="pytorchjob", show_default=True)
@click.option("--storage", default="pvc://distml-workspace", show_default=True, help="Workspace: pvc://NAME/PATH.")
@click.option("--nnodes", default=None, metavar="N|MIN:MAX", help="Pods per training job [default: its workers].")
@click.option("--priority", default="normal", show_default=True, help="low, normal or high (a Kueue priority class).")
@click.option(
    "--scheduler",
    type=click.Choice(["kueue", "volcano"]),
    default="kueue",
    show_default=True,
    help="Admits the training gangs: Kueue queues, or a Volcano Queue and PodGroups (PyTorchJob only).",
)
@click.option("--queue-weight", default=1, show_default=True, type=click.IntRange(min=1), help="The queue's weight.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Pipeline parameter (repeatable).")
def export_k8s_command(target: str | None, out: str, params: tuple[str, ...], **options: Any) -> None:
    """Write a kustomize folder that runs TARGET (default: the end-to-end pipeline) on Kubernetes:
    an Argo WorkflowTemplate and Workflow, Kubeflow training jobs, a KServe InferenceService,
    Kueue (or Volcano) queues, a PVC, the metadata store's Secret and Dockerfiles. Render it: kubectl kustomize OUT."""
    from distml.export.k8s import ExportOptions, export_k8s, write_folder
    from distml.workflow.target import DEFAULT_TARGET

    values = {k.replace("-", "_"): v for k, v in _key_values(params, "--param").items()}
    export = export_k8s(ExportOptions(target=target or DEFAULT_TARGET, params=values, **options))
    for path in write_folder(export, out):
        click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
