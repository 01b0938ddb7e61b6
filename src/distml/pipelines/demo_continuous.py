"""`distml demo-continuous`: the data set arrives in waves while a service answers a steady load.

Splits the training data into waves of Parquet files, starts `distml watch` on an inbox folder,
drops the waves in one after another while clients keep sending requests, and prints per wave:
the candidate, its holdout accuracy against production, promoted or not and why, how fresh the
served model was, and the requests answered and failed during that wave.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.table import Table

from distml.core.errors import DistmlError
from distml.core.layout import ServiceRecord
from distml.pipelines import watches as watch_store
from distml.pipelines.end_to_end import client_images, v2_request


def write_waves(ws: Any, dataset: str, data_dir: str | None, folder: Path, waves: int) -> list[Path]:
    """The data set's train split, shuffled with a fixed seed, as `waves` Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distml.data.datasets import get_dataset

    source = get_dataset(dataset, ws, data_dir, progress=True).splits["train"]
    chunks = list(source.iter_chunks())
    images = np.concatenate([c["image"] for c in chunks])
    labels = np.concatenate([c["label"] for c in chunks])
    order = np.random.default_rng(0).permutation(len(labels))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(order, waves)):
        flat = images[part].reshape(len(part), -1)
        table = pa.table({"image": pa.array(list(flat), type=pa.list_(pa.uint8())), "label": labels[part]})
        paths.append(folder / f"wave{i + 1}.parquet")
        pq.write_table(table, paths[-1])
    return paths


class SteadyLoad:
    """`clients` threads sending V2 requests with real test images, each `pause` s apart; answers and
    failures counted, and every request kept as (sent, ended, ok, error, version), times in wall-clock
    seconds (`time.time()`)."""

    def __init__(self, url: str, model: str, body: dict, clients: int = 2, pause: float = 0.01):
        self.url, self.model, self.body, self.pause = url, model, body, pause
        self.answered = self.failed = 0
        self.versions: dict[str, int] = {}
        self.errors: list[str] = []
        self.records: list[tuple[float, float, bool, str | None, str | None]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                sent = time.time()
                try:
                    response = client.post(f"{self.url}/v2/models/{self.model}/infer", json=self.body)
                    ok, version = response.status_code == 200, response.json().get("model_version")
                    error = None if ok else f"{response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    ok, version, error = False, None, repr(exc)
                with self.lock:
                    self.records.append((sent, time.time(), ok, error, version))
                    if ok:
                        self.answered += 1
                        self.versions[version] = self.versions.get(version, 0) + 1
                    else:
                        self.failed += 1
                        self.errors.append(error)
                time.sleep(self.pause)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.answered, self.failed

    def first_answer_sent_after(self, t: float) -> float | None:
        """When the first request sent after `t` was answered (None: none yet)."""
        with self.lock:
            return min((end for sent, end, ok, _, _ in self.records if ok and sent >= t), default=None)

    def versions_since(self, t: float) -> list[str]:
        """The versions that answered the requests sent after `t`."""
        with self.lock:
            return [version for sent, _, ok, _, version in self.records if ok and sent > t]

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def _wait(predicate, what: str, log: Path, proc: subprocess.Popen, timeout: float = 900) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            tail = log.read_text()[-3000:]
            raise DistmlError(f"distml watch exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.1)
    raise DistmlError(f"timed out waiting for {what}; the watch's log: {log}")


def run_waves(
    ws: Any,
    name: str,
    dataset: str,
    data_dir: str | None,
    paths: list[Path],
    root: Path,
    watch_args: list[str],
    echo=print,
) -> tuple[list[tuple[int, int]], SteadyLoad | None]:
    """Start `distml watch` (`watch_args` added) on an inbox under `root`, drop the waves `paths` one at
    a time, each after the previous one's cycle ended, with a steady load on the service from the
    first model on. Returns (answered, failed) per wave and the load; stops the watch and the service."""
    from distml.serve.service import stop_service

    inbox, log = root / "inbox", root / "watch.log"
    inbox.mkdir(parents=True, exist_ok=True)
    distml = str(Path(sys.executable).with_name("distml"))
    command = [distml, "--workspace", str(ws.root), "watch", "--source", str(inbox), "--name", name]
    command += ["--dataset", dataset, *(["--data-dir", data_dir] if data_dir else []), *watch_args]
    echo(f"watching {inbox} as {name}; the watch's log: {log}; `distml top` shows it live")
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    load: SteadyLoad | None = None
    per_wave: list[tuple[int, int]] = []
    try:
        for i, path in enumerate(paths):
            before = load.counts() if load is not None else (0, 0)
            tmp = inbox / f".{path.name}.tmp"
            tmp.write_bytes(path.read_bytes())
            os.replace(tmp, inbox / path.name)  # arrives atomically
            echo(f"wave {i + 1}: {path.name} dropped into the inbox")
            _wait(lambda n=i + 1: _finished(ws, name, n), f"the cycle of wave {i + 1}", log, proc)
            if load is None:
                record = ServiceRecord.read(ws.root, name, alive=False)
                images, _, _ = client_images(ws, dataset, data_dir, 4)
                load = SteadyLoad(record.url, name, v2_request(images))
                _wait(lambda current=load: current.counts()[0] >= 20, "the first answers", log, proc)
            after = load.counts()
            per_wave.append((after[0] - before[0], after[1] - before[1]))
    finally:
        if load is not None:
            load.finish()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        stop_service(ws, name)
    return per_wave, load


def run_demo(ws: Any, dataset: str, data_dir: str | None, waves: int, epochs: int, echo=print) -> Table:
    """Run the demo in workspace `ws`; returns the table (and leaves nothing running)."""
    name = f"{dataset}-live-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    root = Path(ws.root) / "demo-continuous" / name
    paths = write_waves(ws, dataset, data_dir, root / "waves", waves)
    watch_args = ["--epochs", str(epochs), "--warm-start", "--canary-window", "3"]
    per_wave, load = run_waves(ws, name, dataset, data_dir, paths, root, watch_args, echo)
    return wave_table(ws, name, per_wave, load)


def _finished(ws: Any, name: str, n: int) -> bool:
    rows = watch_store.list_cycles(ws.engine, name)
    return len(rows) >= n and rows[n - 1].status != "running"


def wave_table(ws: Any, name: str, per_wave: list[tuple[int, int]], load: SteadyLoad | None) -> Table:
    from distml.pipelines.continuous import cycle_rows

    rows = [r for r in cycle_rows(ws.engine, name) if r["cycle"] is not None]
    table = Table(title=f"continuous training: watch {name}")
    for column in ("wave", "model version", "holdout accuracy", "production's", "promoted?", "why"):
        table.add_column(column, overflow="fold")
    for column in ("fresh after", "answered", "failed"):
        table.add_column(column, justify="right")
    for i, row in enumerate(rows):
        cand, prod, fresh = row.get("candidate") or {}, row.get("production") or {}, row.get("freshness") or {}
        answered, failed = per_wave[i] if i < len(per_wave) else (0, 0)
        table.add_row(
            f"{i + 1} ({row['records']} rows)",
            row.get("model") or "",
            f"{cand['holdout']:.4f}" if "holdout" in cand else "",
            f"{prod['holdout']:.4f}" if "holdout" in prod else "-",
            {"promoted": "yes", "kept": "no", "rolled_back": "rolled back"}.get(row["status"], row["status"]),
            row.get("reason") or "",
            f"{fresh['total']:.1f} s" if "total" in fresh else "",
            "-" if i == 0 else str(answered),
            "-" if i == 0 else str(failed),
        )
    if load is not None and load.errors:
        table.caption = f"first failure: {load.errors[0]}"
    return table
