"""Ingestion benchmark: samples/s over one shuffled epoch of Fashion-MNIST-shaped data (batch 64)
for distml's Loader (memory cache, disk cache, SQL source epoch 1 vs 2) against torch's DataLoader
and a plain numpy slicing loop. Run `python benchmarks/ingest.py [--quick]`; the last stdout line is JSON.
"""

from __future__ import annotations

import os

# Thread settings before numpy/torch load, the same for every contender (see --threads).
_THREADS = os.environ.get("DISTML_BENCH_THREADS", "2")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distml.data import ArraySource, Compose, DecodeBytes, Loader, Normalize, SqlSource  # noqa: E402
from distml.data.datasets import FASHION_MNIST_FILES, FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402

N_SAMPLES, SHAPE, BATCH = 60_000, (28, 28), 64
TARGETS = {"cached_vs_torch_dataloader": 10, "cached_vs_numpy_slices": 0.5, "sql_epoch2_vs_epoch1": 20}


def log(message: str) -> None:
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


def normalize_step() -> Normalize:
    return Normalize("image", mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, scale=1 / 255)


# -- data ------------------------------------------------------------------------------------


def load_data(workspace: str | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The Fashion-MNIST training split if the workspace already holds its 4 files, else generated."""
    from distml.workspace import default_root

    root = Path(workspace) if workspace else default_root()
    folder = root / "datasets" / "fashion-mnist"
    if all((folder / f.name).is_file() for f in FASHION_MNIST_FILES):
        from distml.data.datasets import fashion_mnist
        from distml.workspace import Workspace

        # data_dir= only verifies the local files (size + MD5); it never downloads.
        train = fashion_mnist(Workspace(root), data_dir=folder, progress=False).splits["train"]
        images = np.ascontiguousarray(train.columns["image"], dtype=np.uint8)
        labels = np.ascontiguousarray(train.columns["label"]).astype(np.int64)
        return images, labels, "fashion-mnist files"
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N_SAMPLES, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, size=N_SAMPLES, dtype=np.int64)
    return images, labels, "generated"


def write_sqlite(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, image BLOB NOT NULL, label INTEGER NOT NULL)")
        flat = images.reshape(len(images), -1)
        con.executemany(
            "INSERT INTO images (id, image, label) VALUES (?, ?, ?)",
            ((i, flat[i].tobytes(), int(labels[i])) for i in range(len(images))),
        )
        con.commit()
    finally:
        con.close()


# -- the epoch loop, identical for every contender ----------------------------------------------


def consume(batches: Iterable[Any], get: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
    """Walk one epoch: count samples and read one scalar per batch (cheap, same for all)."""
    seen, checksum = 0, 0.0
    for batch in batches:
        x, y = get(batch)
        seen += x.shape[0]
        checksum += float(x[0, 0, 0]) + int(y[0])
    return seen, checksum


def from_dict(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["label"]


def from_pair(batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


def timed_epoch(batches: Iterable[Any], get, expected: int, name: str) -> float:
    """Samples/s of one epoch; `batches` is created inside the timed region by the caller's iterator."""
    gc.collect()
    start = time.perf_counter()
    seen, _ = consume(batches, get)
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise RuntimeError(f"{name}: saw {seen} samples in one epoch, expected {expected}")
    return seen / elapsed


def best_of(repeats: int, run: Callable[[], float], name: str) -> float:
    speeds = [run() for _ in range(repeats)]
    log(f"{name}: best {max(speeds):,.0f} samples/s (runs: {', '.join(f'{s:,.0f}' for s in speeds)})")
    return max(speeds)


# -- contenders ---------------------------------------------------------------------------------


def bench_ours(images, labels, mode: str, repeats: int, seed: int, tmp: Path) -> float:
    source = ArraySource({"image": images, "label": labels}, name="fashion-mnist-shaped")
    kwargs = {"cache_dir": tmp / "disk-cache"} if mode == "disk" else {}
    loader = Loader(
        source, batch_size=BATCH, shuffle=True, seed=seed, preprocess=normalize_step(), cache=mode, **kwargs
    )
    start = time.perf_counter()
    loader.fill_cache()
    log(f"ours_{mode}: cache filled in {time.perf_counter() - start:.2f}s (untimed)")
    return best_of(repeats, lambda: timed_epoch(loader, from_dict, len(images), f"ours_{mode}"), f"ours_{mode}")


def bench_sql(db: Path, n: int, seed: int) -> tuple[float, float, float]:
    """(epoch1 samples/s incl. Loader creation + cache fill, epoch2 samples/s, fill seconds)."""
    source = SqlSource.from_table(f"sqlite:///{db}", "images")
    preprocess = Compose([DecodeBytes("image", SHAPE, "uint8"), normalize_step()])
    gc.collect()
    start = time.perf_counter()
    loader = Loader(source, batch_size=BATCH, shuffle=True, seed=seed, preprocess=preprocess, cache="memory")
    seen, _ = consume(loader, from_dict)
    epoch1 = time.perf_counter() - start
    if seen != n:
        raise RuntimeError(f"ours_sql epoch1: saw {seen} samples, expected {n}")
    speed1 = n / epoch1
    speed2 = timed_epoch(loader, from_dict, n, "ours_sql epoch2")
    log(f"ours_sql: epoch1 {speed1:,.0f} samples/s ({epoch1:.2f}s incl. fill), epoch2 {speed2:,.0f} samples/s")
    return speed1, speed2, epoch1


def bench_torch(x: torch.Tensor, y: torch.Tensor, workers: int, seed: int) -> float:
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(x, y)
    generator = torch.Generator().manual_seed(seed)
    gc.collect()
    start = time.perf_counter()  # includes worker start-up: a user pays it every epoch
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, generator=generator, persistent_workers=False
    )
    seen, _ = consume(loader, from_pair)
    elapsed = time.perf_counter() - start
    if seen != len(x):
        raise RuntimeError(f"torch DataLoader nw{workers}: saw {seen} samples, expected {len(x)}")
    log(f"torch_dataloader_nw{workers}: {seen / elapsed:,.0f} samples/s ({len(x)} samples, {elapsed:.2f}s)")
    return seen / elapsed


def numpy_batches(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    perm = rng.permutation(len(x))
    for i in range(0, len(x), BATCH):
        index = perm[i : i + BATCH]
        yield torch.from_numpy(x[index]), torch.from_numpy(y[index])


def bench_numpy(x: np.ndarray, y: np.ndarray, repeats: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return best_of(repeats, lambda: timed_epoch(numpy_batches(x, y, rng), from_pair, len(x), "numpy"), "numpy_slices")


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="end within 60 s on 2 cores (one run per torch DataLoader instead of best of 3)",
    )
    parser.add_argument(
        "--workspace", default=None, help="workspace whose datasets/fashion-mnist/ files to use if present"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="runs of the fast contenders, best kept (default 3)")
    parser.add_argument(
        "--torch-samples",
        type=int,
        default=None,
        help="samples for the torch DataLoader runs (default: all); figures stay samples/s",
    )
    args = parser.parse_args(argv)
    threads = int(_THREADS)
    torch.set_num_threads(threads)
    repeats = args.repeats or 3
    t0 = time.perf_counter()

    images, labels, data = load_data(args.workspace, args.seed)
    n = len(images)
    # Peers get the same normalisation, computed once outside every timed region.
    x_norm = normalize_step()({"image": images})["image"]
    torch_n = min(n, args.torch_samples or n)
    torch_repeats = 1 if args.quick else repeats
    log(
        f"data: {data}, {n} x {images.shape[1:]} uint8, batch {BATCH}, torch threads {threads}, "
        f"{'quick' if args.quick else 'full'} run, torch DataLoader on {torch_n} samples"
    )

    results: dict[str, Any] = {
        "n_samples": n,
        "batch_size": BATCH,
        "data": data,
        "torch_threads": threads,
        "repeats_fast": repeats,
        "repeats_torch": torch_repeats,
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="distml-bench-ingest-") as tmpdir:
        tmp = Path(tmpdir)
        results["ours_memory"] = bench_ours(images, labels, "memory", repeats, args.seed, tmp)
        results["ours_disk"] = bench_ours(images, labels, "disk", repeats, args.seed, tmp)
        results["numpy_slices"] = bench_numpy(x_norm, labels, repeats, args.seed)

        db = tmp / "images.sqlite"
        start = time.perf_counter()
        write_sqlite(db, images, labels)
        log(f"sqlite table written in {time.perf_counter() - start:.2f}s (untimed)")
        sql1, sql2, fill = bench_sql(db, n, args.seed)
        results.update({"ours_sql_epoch1": sql1, "ours_sql_epoch2": sql2, "ours_sql_epoch1_seconds": fill})

    xt, yt = torch.from_numpy(x_norm[:torch_n]), torch.from_numpy(labels[:torch_n])
    for workers in (0, 2):
        results[f"torch_dataloader_nw{workers}"] = best_of(
            torch_repeats, lambda w=workers: bench_torch(xt, yt, w, args.seed), f"torch_dataloader_nw{workers}"
        )
    results["torch_dataloader_samples"] = torch_n
    if torch_n != n:
        results["note"] = (
            f"torch DataLoader runs used the first {torch_n} of {n} samples (one epoch over them); "
            "figures are samples/s so ratios stay comparable"
        )
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)

    best_torch = max(results["torch_dataloader_nw0"], results["torch_dataloader_nw2"])
    ratios = {
        "cached_vs_torch_dataloader": results["ours_memory"] / best_torch,
        "cached_vs_numpy_slices": results["ours_memory"] / results["numpy_slices"],
        "sql_epoch2_vs_epoch1": sql2 / sql1,
        "disk_vs_memory": results["ours_disk"] / results["ours_memory"],
    }
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (" (target %g: %s)" % (target, "met" if value >= target else "MISSED"))
        log(f"{name}: {value:.2f}{verdict}")
    log(f"done in {results['wall_seconds']}s")
    rounded = {
        k: (round(v, 3 if k.endswith("_seconds") else 1) if isinstance(v, float) else v) for k, v in results.items()
    }
    return {
        "benchmark": "ingest",
        "results": rounded,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
