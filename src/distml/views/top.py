"""`distml top`: one live terminal view of a workspace's queues, training, pipelines and services.

Each refresh reads the metadata store (queues, training and pipeline runs) and scrapes the
`/metrics` endpoints that processes record in the workspace (training ranks, orchestrators,
service gateways; see `distml.monitoring.metrics.serve`), parsed with prometheus-client's parser, and
draws them with rich's `Live`. Rates and latency quantiles come from the difference between two
scrapes; an empty section says so and an endpoint that does not answer shows "unreachable".
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from distml.core.layout import ServiceRecord, run_dir, workflow_dir
from distml.monitoring.metrics import read_endpoint
from distml.workflow.view import short_target

SCRAPE_TIMEOUT_S = 0.8
MAX_ROWS = 12
FINAL = ("succeeded", "cached", "skipped", "failed", "upstream_failed", "cancelled")


# -- scraping ------------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One /metrics answer: samples by name as [(labels, value)], or the error that prevented it."""

    at: float
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def values(self, name: str, **match: str) -> list[float]:
        return [v for labels, v in self.samples.get(name, []) if all(labels.get(k) == x for k, x in match.items())]

    def total(self, name: str, **match: str) -> float:
        return sum(self.values(name, **match))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets summed over its other labels, by upper bound."""
        by_le: dict[float, float] = {}
        for labels, value in self.samples.get(f"{name}_bucket", []):
            le = float(labels.get("le", "inf"))
            by_le[le] = by_le.get(le, 0.0) + value
        return sorted(by_le.items())


def parse(text: str, at: float) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            scrape.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return scrape


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    low, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return low  # above the highest finite bound: that bound is all that is known
            return low + (le - low) * (rank - below) / max(count - below, 1e-12)
        low, below = le, count
    return low


def window(now: list[tuple[float, float]], before: list[tuple[float, float]] | None) -> list[tuple[float, float]]:
    """The buckets of the observations made between two scrapes."""
    if not before:
        return []
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in now]


# -- what one frame shows ------------------------------------------------------------------------


class Top:
    """Collects and renders frames; keeps the previous scrape of each endpoint for rates."""

    def __init__(self, workspace: Any, token: str | None = None, timeout: float = SCRAPE_TIMEOUT_S):
        self.ws = workspace
        self.root = Path(workspace.root)
        self.client = httpx.Client(timeout=timeout)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.previous: dict[str, Scrape] = {}
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="distml-top")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- scraping ----------------------------------------------------------------------------

    def scrape_all(self, urls: Iterable[str]) -> dict[str, Scrape]:
        urls = list(dict.fromkeys(urls))
        return dict(zip(urls, self.pool.map(self._scrape, urls), strict=True))

    def _scrape(self, url: str) -> Scrape:
        now = time.monotonic()
        try:
            response = self.client.get(url, headers=self.headers)
        except httpx.HTTPError as exc:
            return Scrape(now, error=f"unreachable ({type(exc).__name__})")
        if response.status_code == 401:
            return Scrape(now, error="unauthorized: set DISTML_SERVE_TOKEN or --token")
        if response.status_code != 200:
            return Scrape(now, error=f"unreachable (HTTP {response.status_code})")
        try:
            return parse(response.text, now)
        except ValueError as exc:
            return Scrape(now, error=f"bad exposition: {exc}")

    def _get_json(self, url: str) -> Any:
        try:
            response = self.client.get(url, headers=self.headers)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError):
            return None

    # -- the frame ---------------------------------------------------------------------------

    def frame(self) -> RenderableType:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        header = Text.assemble(("distml top", "bold"), f"  {self.root}  {stamp}  (Ctrl-C quits)")
        parts: list[RenderableType] = [header]
        for title, build in (
            ("Queues", self.queues),
            ("Training", self.training),
            ("Pipeline runs", self.pipelines),
            ("Watches", self.watches),
            ("Services", self.services),
        ):
            try:
                parts.extend(build())
            except Exception as exc:  # one broken source must not take the whole view down
                parts.append(Text(f"{title}: cannot be read ({type(exc).__name__}: {exc})"[:300], style="red"))
        return Group(*parts)

    # -- queues ------------------------------------------------------------------------------

    def queues(self) -> list[RenderableType]:
        from distml.scheduling.admission import snapshot

        # running jobs show in their own sections
        return queue_view(snapshot(self.ws.engine), running=False, max_rows=MAX_ROWS)

    # -- training ----------------------------------------------------------------------------

    def training(self) -> list[RenderableType]:
        from distml.train.store import list_training_runs

        ranks: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.root.glob("runs/*/metrics/rank-*.json")):
            record = read_endpoint(path)
            if record is not None:
                ranks.setdefault(path.parent.parent.name, []).append(record)
        rows = {r.run_id: r for r in list_training_runs(self.ws.engine, include=ranks)}
        now = dt.datetime.now(dt.UTC)
        shown = [run_id for run_id in ranks]  # live first
        for run_id, row in rows.items():
            if run_id in ranks or row.status != "running":
                continue
            last = row.recorded_at or row.updated_at
            if (now - last).total_seconds() < 600:  # stopped or killed recently: still worth a line
                shown.append(run_id)
        scrapes = self.scrape_all(r["url"] for run_id in shown for r in ranks.get(run_id, []))
        table = Table(
            "run",
            "model",
            "ranks",
            "step",
            "loss",
            "samples/s",
            "world",
            "restarts",
            title="Training",
            title_justify="left",
        )
        for run_id in shown[:MAX_ROWS]:
            config = _read_json(run_dir(self.root, run_id) / "config.json")
            if not config and run_id in rows:
                config = rows[run_id].config
            if config and isinstance(config.get("model"), dict):  # a config of sections (older runs': flat)
                config = {"model": config["model"].get("name"), "dataset": config.get("data", {}).get("dataset")}
            model = f"{config.get('model', '?')}/{config.get('dataset', '?')}" if config else ""
            records = ranks.get(run_id, [])
            answers = [scrapes[r["url"]] for r in records if scrapes[r["url"]].ok]
            if answers:
                losses = [v for s in answers for v in s.values("distml_train_loss") if not math.isnan(v)]
                table.add_row(
                    run_id,
                    model,
                    f"{len(answers)}/{len(records)} up",
                    f"{max(s.total('distml_train_step') for s in answers):.0f}",
                    f"{sum(losses) / len(losses):.4f}" if losses else "-",
                    f"{sum(s.total('distml_train_samples_per_second') for s in answers):,.0f}",
                    f"{max(s.total('distml_train_world_size') for s in answers):.0f}",
                    f"{max(s.total('distml_train_restarts') for s in answers):.0f}",
                )
                continue
            step = rows.get(run_id)
            state = "unreachable" if records else "no live rank"
            table.add_row(
                run_id,
                model,
                Text(state, style="yellow"),
                f"{step.step}" if step and step.step is not None else "-",
                f"{step.loss:.4f}" if step and step.loss is not None else "-",
                f"{step.samples_per_s:,.0f} (stored)" if step and step.samples_per_s is not None else "-",
                "-",
                "-",
            )
        if not shown:
            return [Text("Training: no run in progress", style="dim")]
        return [table]

    # -- pipeline runs -----------------------------------------------------------------------

    def pipelines(self) -> list[RenderableType]:
        from distml.core.liveness import pid_alive
        from distml.workflow.store import list_workflow_runs

        runs = list_workflow_runs(self.ws.engine, limit=30)
        running = [r for r in runs if r.status == "running"]
        recent = [r for r in runs if r.status != "running"][: max(0, 5 - len(running))]
        chosen = (running + recent)[:MAX_ROWS]
        if not chosen:
            return [Text("Pipeline runs: none yet", style="dim")]
        endpoints = {}
        for run in running:
            record = read_endpoint(workflow_dir(self.root, run.run_id) / "metrics.json")
            if record is not None:
                endpoints[run.run_id] = record["url"]
        scrapes = self.scrape_all(endpoints.values())
        table = Table(
            "run",
            "target",
            "status",
            "steps done",
            "running",
            "cached",
            "failed",
            "for",
            title="Pipeline runs",
            title_justify="left",
        )
        import socket

        here = socket.gethostname()
        now = dt.datetime.now(dt.UTC)
        for run in chosen:
            counts = dict(run.steps)
            status: Any = run.status
            scrape = scrapes.get(endpoints.get(run.run_id, ""))
            if run.status == "running":
                if run.host == here and not pid_alive(run.pid or 0):
                    status = Text("orchestrator gone", style="yellow")
                elif scrape is not None and scrape.ok:  # live: the orchestrator's own view
                    counts = {labels["state"]: int(v) for labels, v in scrape.samples.get("distml_workflow_steps", [])}
                else:
                    status = Text("running, metrics unreachable", style="yellow")
            total = sum(counts.values())
            done = sum(counts.get(s, 0) for s in FINAL)
            end = now if run.status == "running" else run.updated_at
            table.add_row(
                run.run_id,
                short_target(run.target),
                status,
                f"{done}/{total}",
                str(counts.get("running", 0)),
                str(counts.get("cached", 0)),
                str(counts.get("failed", 0) + counts.get("upstream_failed", 0)),
                _duration((end - run.created_at).total_seconds()),
            )
        return [table]

    # -- services ----------------------------------------------------------------------------

    def services(self) -> list[RenderableType]:
        records = [asdict(record) for record in ServiceRecord.all(self.root)]
        if not records:
            return [Text("Services: none running", style="dim")]
        scrapes = self.scrape_all(r["url"].rstrip("/") + "/metrics" for r in records)
        table = Table(
            "service",
            "versions",
            "replicas",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "url",
            title="Services",
            title_justify="left",
        )
        for record in records[:MAX_ROWS]:
            url = record["url"].rstrip("/")
            scrape = scrapes[url + "/metrics"]
            name = record.get("name") or Path(url).name
            if not scrape.ok:
                table.add_row(name, record.get("model", ""), Text(scrape.error or "", style="red"), "", "", "", "", url)
                continue
            before = self.previous.get(url)
            self.previous[url] = scrape
            requests = scrape.total("distml_gateway_requests_total")
            errors = sum(
                v
                for labels, v in scrape.samples.get("distml_gateway_requests_total", [])
                if not labels.get("status", "").startswith("2")
            )
            rate = "-"
            recent: list[tuple[float, float]] = []
            if before is not None and before.ok and scrape.at > before.at:
                rate = f"{(requests - before.total('distml_gateway_requests_total')) / (scrape.at - before.at):,.1f}"
                recent = window(
                    scrape.buckets("distml_gateway_request_seconds"), before.buckets("distml_gateway_request_seconds")
                )
            p50, p99 = quantile(0.5, recent), quantile(0.99, recent)
            table.add_row(
                name,
                self._versions(url, record),
                f"{scrape.total('distml_gateway_replicas_ready'):.0f}/{scrape.total('distml_gateway_replicas_desired'):.0f}",
                rate,
                f"{p50 * 1000:.1f}" if p50 is not None else "-",
                f"{p99 * 1000:.1f}" if p99 is not None else "-",
                f"{errors:.0f}/{requests:.0f}",
                url,
            )
        return [table]

    # -- continuous training ---------------------------------------------------------------

    def watches(self) -> list[RenderableType]:
        from distml.core.liveness import pid_alive
        from distml.models.registry import get_model_alias
        from distml.pipelines.watches import watch_summaries

        live = [w for w in watch_summaries(self.ws.engine) if w.watch.pid and pid_alive(w.watch.pid)]
        if not live:
            return [Text("Watches: none running", style="dim")]
        table = Table(
            "watch", "source", "pending", "cycle", "production", "last decision", title="Watches", title_justify="left"
        )
        for summary in live[:MAX_ROWS]:
            w, cycles = summary.watch, summary.cycles
            pending, rejected = summary.arrivals.get("pending", 0), summary.arrivals.get("rejected", 0)
            production = get_model_alias(self.ws.engine, w.name, "production")
            now = cycles[-1] if cycles else None
            done = next((c for c in reversed(cycles) if c.status != "running"), None)
            last = ""
            if done is not None:
                fresh = done.timings
                last = f"{done.cycle}: {done.status} {done.decision.get('model') or ''}"
                last += f", fresh after {fresh['total']:.1f} s" if "total" in fresh else ""
            table.add_row(
                w.name,
                str(w.settings.get("source", "")),
                f"{pending}" + (f" ({rejected} rejected)" if rejected else ""),
                f"{now.cycle} {now.status}" if now is not None else "-",
                f"{w.name}:{production}" if production is not None else "-",
                last,
            )
        return [table]

    def _versions(self, url: str, record: dict[str, Any]) -> str:
        """The model versions the replicas serve, with the canary split when there is one."""
        snap = self._get_json(url + "/admin/replicas")
        if not isinstance(snap, dict):
            return str(record.get("model", ""))
        refs: list[str] = []
        for group in snap.get("groups", []):
            for replica in group.get("replicas", []) or [{"models": group.get("models", [])}]:
                for ref in replica.get("models", []):
                    if ref not in refs:
                        refs.append(ref)
        split = []
        for model, versions in (snap.get("traffic") or {}).items():
            if versions:
                split.append(f"{model} " + " ".join(f"v{v}:{w:g}%" for v, w in versions.items()))
        return ", ".join(refs) + (f" ({'; '.join(split)})" if split else "")


# -- small formatting helpers --------------------------------------------------------------------


def queue_view(pool: dict[str, Any], *, running: bool = True, max_rows: int | None = None) -> list[RenderableType]:
    """The pool, its queues and their jobs (`admission.snapshot()`), as `distml queue` and
    `distml top` show them; `running=False` leaves running jobs out."""
    from distml.scheduling.core import priority_name

    node, used = pool["node"], pool["used"]
    table = Table(
        "queue",
        "weight",
        "nominal",
        "share",
        "running",
        "waiting",
        title=f"Queues  (pool {node['name']}: {used['cpus']:g}/{node['cpus']:g} cpu slots, "
        f"{used['gpus']:g}/{node['gpus']:g} gpus, {used['memory_gb']:g}/{node['memory_gb']:g} GiB)",
        title_justify="left",
    )
    for q in pool["queues"]:
        table.add_row(
            q["name"],
            f"{q['weight']:g}",
            f"{q['nominal_share']:.0%}",
            f"{q['share']:.2f}" + (" borrowing" if q["share"] > 1 + 1e-9 else ""),
            str(q["running"]),
            str(q["waiting"]),
        )
    out: list[RenderableType] = [table]
    jobs = [j for j in pool["jobs"] if running or j["state"] != "running"]
    if not jobs:
        out.append(Text("no job waiting" if not running else "no job running or waiting", style="dim"))
        return out
    listed = Table("job", "kind", "queue", "priority", "gang", "state", "for", "why", title_justify="left")
    now = time.time()
    for job in jobs[:max_rows]:
        since = job["submitted_at"] if job["state"] == "waiting" else (job["started_at"] or job["submitted_at"])
        gang = f"{job['tasks']} x {job['cpus']:g} cpu" + (f" + {job['gpus']} gpu" if job["gpus"] else "")
        listed.add_row(
            job["name"],
            job["kind"],
            job["queue"],
            priority_name(job["priority"]),
            gang,
            job["state"],
            _duration(now - since),
            job["reason"] or "",
        )
    out.append(listed)
    if max_rows is not None and len(jobs) > max_rows:
        out.append(Text(f"... and {len(jobs) - max_rows} more"))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# -- the command ---------------------------------------------------------------------------------


def _fit(console: Console) -> None:
    """Size the view to the terminal as it is now (rich prefers $COLUMNS, which may be stale)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return
    console.size = (size.columns, size.lines)


def run_top(workspace: Any, *, once: bool = False, interval: float = 1.0, token: str | None = None) -> None:
    """Redraw every `interval` seconds until Ctrl-C; with `once`, print one frame and return
    (after one interval, so that request rates and latencies cover it)."""
    from rich.live import Live

    top = Top(workspace, token)
    try:
        if once:
            console = Console(width=None if sys.stdout.isatty() else 160)
            top.frame()  # the first scrape of each endpoint: the baseline of the rates
            time.sleep(interval)
            console.print(top.frame())
            return
        console = Console()
        _fit(console)
        with Live(top.frame(), console=console, screen=True, auto_refresh=False, redirect_stderr=False) as live:
            while True:
                time.sleep(interval)
                _fit(console)
                live.update(top.frame(), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        top.close()
