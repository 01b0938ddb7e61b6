"""Ingestion benchmark: samples/s over shuffled epochs of Fashion-MNIST-shaped data (batch 64).

Part 1, one process, the whole data set: distml's Loader (memory cache, disk cache, SQL source epoch 1 vs 2)
against a plain numpy slicing loop and torch's DataLoader configured as a competent user runs it (batched indexing
through a BatchSampler, persistent workers started outside the timed region, best of 0 and 2 workers).
Part 2, the same Parquet files for everyone, sharded for 2 ranks with a shuffled order, rank 0 measured: distml's
Loader against Hugging Face `datasets` (Arrow-backed, `.shard()`, torch format) and Mosaic `streaming`
(`StreamingDataset` over MDS files it writes first, untimed), each for its first epoch from the files and a later
epoch (cached where the peer caches). The peers run as subprocesses of `.venv-peers/bin/python` (`make bench-peers`)
running this same file with `--peer SPEC.json`; one that is missing is skipped with a note.
Run `python benchmarks/ingest.py [--quick] [--check]`; the last stdout line is JSON.
"""

from __future__ import annotations

import os

# Thread settings before numpy/torch load, the same for every contender (see DISTML_BENCH_THREADS).
_THREADS = os.environ.get("DISTML_BENCH_THREADS", "2")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# distml is imported inside the functions that use it: `--peer` runs this file in .venv-peers, which has no distml.

ROOT = Path(__file__).resolve().parents[1]
PEERS_VENV = ROOT / ".venv-peers"
N_SAMPLES, SHAPE, BATCH, WORLD = 60_000, (28, 28), 64, 2
QUICK_SAMPLES = 15_000
PARQUET_FILES, ROW_GROUP = 2, 10_000
# Two targets of the first version were set against weaker baselines and are replaced, with why:
# cached_vs_torch_dataloader >= 10 was measured against per-sample __getitem__ + collate; the DataLoader
# a competent user runs gathers each batch with one vectorised index, as ours does, so the target is
# parity. sql_epoch2_vs_epoch1 >= 20 rewards a slow first epoch (the faster the SQL read, the lower the
# ratio; it is still reported); what the cache promises is that later epochs never touch the source:
# sql_epoch2_vs_memory, a SQL-backed loader's second epoch against the in-memory loader.
TARGETS = {
    "cached_vs_torch_dataloader": 1.0,
    "cached_vs_numpy_slices": 0.8,
    "sql_epoch2_vs_memory": 0.9,
    "ours_vs_best_peer_epoch1": 1.0,
    "ours_vs_best_peer_cached": 1.0,
}
# What each peer needs in .venv-peers (distribution names) and the versions it reports.
PEER_PACKAGES = {"datasets": ("datasets", "torch"), "streaming": ("mosaicml-streaming", "torchvision", "torch")}


def log(message: str) -> None:
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


def normalize_step():
    from distml.data import Normalize
    from distml.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    return Normalize("image", mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, scale=1 / 255)


# -- data ------------------------------------------------------------------------------------


def load_data(workspace: str | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The Fashion-MNIST training split if the workspace already holds its 4 files, else generated."""
    from distml.core import HOME_ENV
    from distml.data.datasets import FASHION_MNIST_FILES
    from distml.workspace import DEFAULT_ROOT

    root = Path(workspace or os.environ.get(HOME_ENV) or DEFAULT_ROOT)
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


def write_parquet(folder: Path, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """PARQUET_FILES files of ROW_GROUP-row groups: `image` a fixed-size list of 784 uint8 pixels (what
    `datasets` reads as a tensor column), `label` int64; the files every part-2 contender reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    flat = images.reshape(len(images), -1)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(images)), PARQUET_FILES)):
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat[part].ravel(), pa.uint8()), flat.shape[1])
        table = pa.table({"image": pixels, "label": pa.array(labels[part], pa.int64())})
        path = folder / f"part-{i}.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP)
        paths.append(str(path))
    return paths


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


def timed_epoch(batches: Iterable[Any], get, expected: int | None, name: str) -> float:
    """Samples/s of one epoch; `batches` is created inside the timed region by the caller's iterator."""
    gc.collect()
    start = time.perf_counter()
    seen, _ = consume(batches, get)
    elapsed = time.perf_counter() - start
    if expected is not None and seen != expected:
        raise RuntimeError(f"{name}: saw {seen} samples in one epoch, expected {expected}")
    return seen / elapsed


def best_of(repeats: int, run: Callable[[], float], name: str) -> float:
    speeds = [run() for _ in range(repeats)]
    log(f"{name}: best {max(speeds):,.0f} samples/s (runs: {', '.join(f'{s:,.0f}' for s in speeds)})")
    return max(speeds)


# -- part 1: in memory, the whole data set ---------------------------------------------------------


def bench_ours(images, labels, mode: str, repeats: int, seed: int, tmp: Path) -> float:
    from distml.data import ArraySource, Loader

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
    from distml.data import Compose, DecodeBytes, Loader, SqlSource

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


def bench_torch(x: torch.Tensor, y: torch.Tensor, workers: int, repeats: int, seed: int) -> float:
    """torch's DataLoader as a competent user runs it on in-memory tensors: a BatchSampler as the sampler and
    batch_size=None, so each batch is one vectorised `tensor[indices]` (no per-sample __getitem__ + collate);
    with workers, persistent ones started by an untimed warm-up epoch; best of `repeats` epochs."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    dataset = TensorDataset(x, y)
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size=BATCH, drop_last=False)
    options: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers, **options)
    name = f"torch_dataloader_nw{workers}"
    start = time.perf_counter()
    consume(loader, from_pair)  # untimed: starts the persistent workers
    log(f"{name}: warm-up epoch {time.perf_counter() - start:.2f}s (untimed, starts the workers)")
    return best_of(repeats, lambda: timed_epoch(loader, from_pair, len(x), name), name)  # workers stop with loader


def numpy_batches(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    perm = rng.permutation(len(x))
    for i in range(0, len(x), BATCH):
        index = perm[i : i + BATCH]
        yield torch.from_numpy(x[index]), torch.from_numpy(y[index])


def bench_numpy(x: np.ndarray, y: np.ndarray, repeats: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return best_of(repeats, lambda: timed_epoch(numpy_batches(x, y, rng), from_pair, len(x), "numpy"), "numpy_slices")


# -- part 2: the Parquet files, rank 0 of 2 ---------------------------------------------------------


def bench_ours_parquet(paths: list[str], mode: str, repeats: int, seed: int, tmp: Path) -> dict[str, float]:
    """Rank 0's shard: epoch 1 = ParquetSource + Loader creation, the cache fill from the files and the epoch;
    a later epoch from the cache. Best of `repeats` fresh loaders (a fresh disk cache folder each)."""
    from distml.data import Compose, Loader, ParquetSource, Reshape

    preprocess = Compose([Reshape("image", SHAPE), normalize_step()])
    first, later = [], []
    for r in range(repeats):
        gc.collect()
        start = time.perf_counter()
        source = ParquetSource(paths, columns=["image", "label"])
        kwargs = {"cache_dir": tmp / f"parquet-cache-{mode}-{r}"} if mode == "disk" else {}
        loader = Loader(
            source,
            batch_size=BATCH,
            shard=(0, WORLD),
            shuffle=True,
            seed=seed,
            preprocess=preprocess,
            cache=mode,
            **kwargs,
        )
        seen, _ = consume(loader, from_dict)
        first.append(seen / (time.perf_counter() - start))
        later.append(timed_epoch(loader, from_dict, seen, f"ours_parquet_{mode} epoch2"))
        del loader, source
    name = f"ours_parquet_{mode}"
    log(
        f"{name} (rank 0 of {WORLD}, {seen} samples): epoch1 best {max(first):,.0f} samples/s "
        f"(runs: {', '.join(f'{s:,.0f}' for s in first)}), later epoch best {max(later):,.0f} "
        f"(runs: {', '.join(f'{s:,.0f}' for s in later)})"
    )
    return {"epoch1": max(first), "cached": max(later), "samples_per_rank": seen}


def peer_versions(packages: Iterable[str]) -> dict[str, str] | str:
    """Installed versions of `packages` in .venv-peers (read from its metadata, no import), or why not."""
    from importlib.metadata import distributions

    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        return f"{PEERS_VENV} does not exist; add it with `make bench-peers` (scripts/bench-peers.sh)"
    sites = [str(p) for p in sorted(PEERS_VENV.glob("lib/python*/site-packages"))]
    found = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in distributions(path=sites)}
    missing = [p for p in packages if p not in found]
    if missing:
        names = ", ".join(missing)
        return f"{names} not installed in {PEERS_VENV}; add it with `make bench-peers` (scripts/bench-peers.sh)"
    return {p: found[p] for p in packages}


def run_peer(peer: str, spec: dict[str, Any], tmp: Path, timeout: float) -> dict[str, Any]:
    """Run one peer in .venv-peers; its stderr is passed through, its last stdout line is its JSON result."""
    spec_path = tmp / f"peer-{peer}.json"
    spec_path.write_text(json.dumps({**spec, "peer": peer}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="0")
    env.update(PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), str(Path(__file__).resolve()), "--peer", str(spec_path)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tmp,
        timeout=timeout,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peer {peer} exited with {proc.returncode}: {proc.stdout[-2000:]}")
    return json.loads(lines[-1])


# -- the peers' side: runs in .venv-peers (no distml there) --------------------------------------------


def peer_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(_THREADS))
    result = {"datasets": peer_datasets, "streaming": peer_streaming}[spec["peer"]](spec)
    if spec.get("role") != "partner":
        print(json.dumps(result))


def peer_normalizer(spec: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The peers' preprocessing, per batch in the timed loop: uint8 pixels to `(x / 255 - mean) / std` float32
    of shape (B, 28, 28), as distml's Normalize (which runs once, before its cache)."""
    scale, shift = spec["scale"] / spec["std"], spec["mean"] / spec["std"]

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *SHAPE).to(torch.float32).mul_(scale).sub_(shift)

    return normalize


def peer_log(peer: str, name: str, first: list[float], later: list[float], seen: int) -> None:
    log(
        f"{peer} {name} (rank 0 of {WORLD}, {seen} samples): epoch1 best {max(first):,.0f} samples/s "
        f"(runs: {', '.join(f'{s:,.0f}' for s in first)}), later epoch best {max(later):,.0f} "
        f"(runs: {', '.join(f'{s:,.0f}' for s in later)})"
    )


def peer_datasets(spec: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face datasets: `load_dataset("parquet")` converts the files into its Arrow cache (memory-mapped;
    `num_proc` workers, one per file, when there are several cores), `.shard(2, 0)` takes rank 0's contiguous half,
    Epoch: `ds.shuffle(seed + epoch).iter(batch_size=64)` (a shuffled indices mapping over the shard), with
    `.with_format("torch")` or, faster, `.with_format("arrow")` and one vectorised Arrow -> numpy -> torch
    conversion per batch; best kept. Epoch 1 includes the conversion into a fresh cache_dir; a later epoch reads
    the Arrow cache."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    normalize = peer_normalizer(spec)

    def get(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(batch["image"]), batch["label"]

    def get_arrow(batch) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch.column("image").combine_chunks().flatten().to_numpy().reshape(batch.num_rows, -1)
        return normalize(torch.from_numpy(pixels)), torch.from_numpy(batch.column("label").to_numpy())

    def epoch(ds, e: int):
        return ds.shuffle(seed=spec["seed"] + e).iter(batch_size=BATCH)

    num_proc = min(len(spec["paths"]), os.cpu_count() or 1)
    out: dict[str, Any] = {"version": datasets.__version__, "num_proc": num_proc if num_proc > 1 else None}
    for name, fmt, getter in (("torch_format", "torch", get), ("arrow_format", "arrow", get_arrow)):
        first, later = [], []
        for r in range(spec["repeats"]):
            cache_dir = Path(spec["tmp"]) / f"hf-cache-{name}-{r}"
            gc.collect()
            start = time.perf_counter()
            ds = datasets.load_dataset(
                "parquet",
                data_files=spec["paths"],
                split="train",
                cache_dir=str(cache_dir),
                num_proc=out["num_proc"],
            )
            ds = ds.shard(num_shards=WORLD, index=0).with_format(fmt)
            seen, _ = consume(epoch(ds, 0), getter)
            first.append(seen / (time.perf_counter() - start))
            later.append(timed_epoch(epoch(ds, 1), getter, seen, f"datasets {name} epoch2"))
            del ds
        peer_log("datasets", name, first, later, seen)
        out[name] = {"epoch1": max(first), "cached": max(later), "samples_per_rank": seen}
    return out


def define_torchvision_schemas() -> None:
    """`import streaming` imports torchvision (for streaming.vision). PyPI's torchvision for torch 2.13 is the CUDA
    build: beside the CPU torch its C++ operators do not load, and its import then fails at an unguarded
    `register_fake("torchvision::nms")`. Declaring that schema (and qnms's) first lets it import; streaming's
    datasets and writers use none of torchvision's operators. scripts/bench-peers.sh checks the same way."""
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    define_torchvision_schemas.lib = lib  # keep the library alive


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peer_streaming(spec: dict[str, Any]) -> dict[str, Any]:
    """Mosaic streaming: MDSWriter converts the Parquet files into MDS shards (untimed, as a user does once);
    epoch 1 = StreamingDataset(local=MDS folder, shuffle=True, batch_size=64) created and read from those files
    through its StreamingDataLoader; a later epoch is the next iteration of the same loader (local shards, no
    remote: nothing else to cache). World 2 on one node (RANK, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2): streaming
    needs a torch.distributed group for that (its constructor inits one from MASTER_ADDR/PORT) and its local ranks
    meet at a barrier every epoch, so rank 1 runs beside rank 0 in a partner process doing the same (its start-up
    untimed); rank 0 is measured. num_canonical_nodes and the shuffle left to their defaults (py1e, 64 x nodes).
    num_workers=0: with workers, streaming 0.13's barrier file lock fails under filelock 4 ("inherited across
    fork")."""
    role = spec.get("role", "rank0")
    rank = 1 if role == "partner" else 0
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1")
    define_torchvision_schemas()
    import warnings

    warnings.simplefilter("ignore")
    import pyarrow.parquet as pq
    import streaming
    from streaming import MDSWriter, StreamingDataLoader, StreamingDataset

    normalize = peer_normalizer(spec)
    mds = Path(spec["tmp"]) / "mds"
    configs = [("nw0", 0)]

    def get(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(batch["image"]), batch["label"]

    def make_loader(workers: int):
        ds = StreamingDataset(local=str(mds), shuffle=True, shuffle_seed=spec["seed"], batch_size=BATCH)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers)

    if role == "partner":
        Path(spec["ready"]).write_text("ready")
        for _, workers in configs:
            for _ in range(spec["repeats"]):
                loader = make_loader(workers)
                consume(loader, get)
                consume(loader, get)
                del loader
        return {}

    start = time.perf_counter()
    with MDSWriter(out=str(mds), columns={"image": f"ndarray:uint8:{SHAPE[0]},{SHAPE[1]}", "label": "int64"}) as out:
        for path in spec["paths"]:
            table = pq.read_table(path)
            images = np.stack(table.column("image").to_numpy(zero_copy_only=False)).reshape(-1, *SHAPE)
            labels = table.column("label").to_numpy()
            for i in range(len(labels)):
                out.write({"image": images[i], "label": labels[i]})
    log(f"streaming: MDS shards written in {time.perf_counter() - start:.2f}s (untimed)")

    port = str(free_port())
    os.environ["MASTER_PORT"] = port
    ready = Path(spec["tmp"]) / "partner-ready"
    partner_spec = Path(spec["tmp"]) / "partner.json"
    partner_spec.write_text(json.dumps({**spec, "role": "partner", "ready": str(ready)}))
    partner = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--peer", str(partner_spec)],
        env={**os.environ, "MASTER_PORT": port},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        while not ready.exists():  # untimed: the partner's imports
            if partner.poll() is not None:
                raise RuntimeError(f"streaming's rank-1 partner exited with {partner.returncode}")
            time.sleep(0.05)
        result: dict[str, Any] = {"version": streaming.__version__}
        for name, workers in configs:
            first, later = [], []
            for _ in range(spec["repeats"]):
                gc.collect()
                start = time.perf_counter()
                loader = make_loader(workers)
                seen, _ = consume(loader, get)
                first.append(seen / (time.perf_counter() - start))
                later.append(timed_epoch(loader, get, None, f"streaming {name} epoch2"))
                del loader
            peer_log("streaming", name, first, later, seen)
            result[name] = {"epoch1": max(first), "cached": max(later), "samples_per_rank": seen}
        partner.wait(timeout=120)
    finally:
        if partner.poll() is None:
            partner.kill()
    return result


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"about a minute on 2 cores: {QUICK_SAMPLES:,} samples, 1 peer repeat"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--workspace", default=None, help="workspace whose datasets/fashion-mnist/ files to use if present"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="runs of each contender, best kept (default 3)")
    parser.add_argument("--no-peers", action="store_true", help="skip the .venv-peers contenders (part 2 peers)")
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: run one peer from a spec file
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from distml.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    threads = int(_THREADS)
    torch.set_num_threads(threads)
    repeats = args.repeats or 3
    peer_repeats = args.repeats or (1 if args.quick else 3)
    t0 = time.perf_counter()

    images, labels, data = load_data(args.workspace, args.seed)
    if args.quick:  # streaming reads ~1k samples/s per rank here: a quarter of the data keeps quick near a minute
        images, labels = images[:QUICK_SAMPLES], labels[:QUICK_SAMPLES]
        data += f", first {QUICK_SAMPLES:,} (--quick)"
    n = len(images)
    # Part 1's peers get the same normalisation, computed once outside every timed region.
    x_norm = normalize_step()({"image": images})["image"]
    log(
        f"data: {data}, {n} x {images.shape[1:]} uint8, batch {BATCH}, torch threads {threads}, "
        f"{'quick' if args.quick else 'full'} run, {repeats} repeats (part 2: {peer_repeats})"
    )

    results: dict[str, Any] = {
        "n_samples": n,
        "batch_size": BATCH,
        "data": data,
        "torch_threads": threads,
        "repeats": repeats,
        "repeats_parquet": peer_repeats,
        "quick": args.quick,
    }
    skipped: list[str] = []
    peers: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="distml-bench-ingest-") as tmpdir:
        tmp = Path(tmpdir)
        # part 1
        results["ours_memory"] = bench_ours(images, labels, "memory", repeats, args.seed, tmp)
        results["ours_disk"] = bench_ours(images, labels, "disk", repeats, args.seed, tmp)
        results["numpy_slices"] = bench_numpy(x_norm, labels, repeats, args.seed)
        xt, yt = torch.from_numpy(x_norm), torch.from_numpy(labels)
        for workers in (0, 2):
            results[f"torch_dataloader_nw{workers}"] = bench_torch(xt, yt, workers, repeats, args.seed)
        del xt, yt

        db = tmp / "images.sqlite"
        start = time.perf_counter()
        write_sqlite(db, images, labels)
        log(f"sqlite table written in {time.perf_counter() - start:.2f}s (untimed)")
        sql1, sql2, fill = bench_sql(db, n, args.seed)
        results.update({"ours_sql_epoch1": sql1, "ours_sql_epoch2": sql2, "ours_sql_epoch1_seconds": fill})
        db.unlink()

        # part 2
        start = time.perf_counter()
        paths = write_parquet(tmp / "parquet", images, labels)
        log(f"parquet: {PARQUET_FILES} files of {ROW_GROUP}-row groups written in {time.perf_counter() - start:.2f}s")
        for mode in ("memory", "disk"):
            for key, value in bench_ours_parquet(paths, mode, peer_repeats, args.seed, tmp).items():
                results[f"ours_parquet_{mode}_{key}"] = value
        spec = {
            "paths": paths,
            "seed": args.seed,
            "repeats": peer_repeats,
            "mean": FASHION_MNIST_MEAN,
            "std": FASHION_MNIST_STD,
            "scale": 1 / 255,
        }
        for peer, packages in PEER_PACKAGES.items():
            versions = peer_versions(packages) if not args.no_peers else "--no-peers"
            if isinstance(versions, str):
                skipped.append(f"{peer}: {versions}")
                log(f"peer {peer} skipped: {versions}")
                continue
            folder = tmp / f"peer-{peer}"
            folder.mkdir()
            try:
                out = run_peer(peer, {**spec, "tmp": str(folder)}, tmp, timeout=600)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                skipped.append(f"{peer}: failed ({str(exc)[-300:]}); check it with `make bench-peers`")
                log(f"peer {peer} failed: {exc}")
                continue
            peers[peer] = {"versions": versions, **out}
            for config, value in out.items():
                if isinstance(value, dict):
                    for key, figure in value.items():
                        results[f"{peer}_{config}_{key}"] = figure
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)

    best_torch = max(results["torch_dataloader_nw0"], results["torch_dataloader_nw2"])
    ratios = {
        "cached_vs_torch_dataloader": results["ours_memory"] / best_torch,
        "cached_vs_numpy_slices": results["ours_memory"] / results["numpy_slices"],
        "sql_epoch2_vs_epoch1": sql2 / sql1,
        "sql_epoch2_vs_memory": sql2 / results["ours_memory"],
        "disk_vs_memory": results["ours_disk"] / results["ours_memory"],
    }
    ours1 = max(results["ours_parquet_memory_epoch1"], results["ours_parquet_disk_epoch1"])
    ours2 = max(results["ours_parquet_memory_cached"], results["ours_parquet_disk_cached"])
    best: dict[str, tuple[str, float]] = {}
    for phase in ("epoch1", "cached"):
        figures = [
            (f"{peer}_{config}", value[phase])
            for peer, out in peers.items()
            for config, value in out.items()
            if isinstance(value, dict) and phase in value
        ]
        if figures:
            best[phase] = max(figures, key=lambda item: item[1])
    for peer, out in peers.items():
        for phase, ours in (("epoch1", ours1), ("cached", ours2)):
            top = max(v[phase] for v in out.values() if isinstance(v, dict) and phase in v)
            ratios[f"ours_vs_{peer}_{phase}"] = ours / top
    if "epoch1" in best:
        ratios["ours_vs_best_peer_epoch1"] = ours1 / best["epoch1"][1]
        ratios["ours_vs_best_peer_cached"] = ours2 / best["cached"][1]
        results["best_peer_epoch1"] = best["epoch1"][0]
        results["best_peer_cached"] = best["cached"][0]

    met = {name: ratios[name] >= target for name, target in TARGETS.items() if name in ratios}
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (" (target %g: %s)" % (target, "met" if value >= target else "MISSED"))
        log(f"{name}: {value:.2f}{verdict}")
    for name in TARGETS:
        if name not in ratios:
            log(f"{name}: not measured (no peer ran)")
    log(f"done in {results['wall_seconds']}s")
    rounded = {
        k: (round(v, 3 if k.endswith("_seconds") else 1) if isinstance(v, float) else v) for k, v in results.items()
    }
    rounded["config"] = config_notes(peers)
    if skipped:
        rounded["skipped"] = skipped
    return {
        "benchmark": "ingest",
        "results": rounded,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "targets_met": met,
    }


def config_notes(peers: dict[str, dict[str, Any]]) -> dict[str, str]:
    notes = {
        "part1": (
            f"in memory, all {N_SAMPLES} samples, shuffled, batch {BATCH}, float32 normalised images: ours = Loader("
            "ArraySource, cache='memory'|'disk', preprocess=Normalize) after an untimed fill; numpy_slices = "
            "x[perm[i:i+64]] on pre-normalised arrays; torch_dataloader_nw{0,2} = DataLoader(TensorDataset, "
            "sampler=BatchSampler(RandomSampler), batch_size=None), workers persistent and started by an untimed "
            "warm-up epoch; best of the same repeats for all"
        ),
        "part2": (
            f"the same {PARQUET_FILES} Parquet files ({ROW_GROUP}-row groups; image a fixed-size list of 784 uint8, "
            f"label int64), rank 0 of {WORLD} (samples per rank in *_samples_per_rank), shuffled, batch {BATCH}, "
            "images delivered as normalised float32 (B, 28, 28); epoch1 = from the files, creation included, "
            "imports excluded; cached = a later epoch; best of repeats_parquet fresh runs; ours = Loader("
            "ParquetSource, shard=(0, 2), preprocess=Reshape+Normalize, cache='memory'|'disk'), best of the two; "
            "peers normalise each batch in torch inside the timed loop"
        ),
        "datasets": (
            "load_dataset('parquet', data_files, cache_dir=fresh, num_proc=files when >1 core) -> .shard(2, 0) "
            "-> .with_format('torch') ('torch_format') or .with_format('arrow') + one vectorised arrow->torch "
            "conversion per batch ('arrow_format'); epoch = .shuffle(seed+epoch).iter(batch_size=64); best kept"
        ),
        "streaming": (
            "MDSWriter(image 'ndarray:uint8:28,28', label 'int64', default shard size) untimed; StreamingDataset("
            "local=mds, shuffle=True, shuffle_seed, batch_size=64, defaults otherwise: py1e shuffle, "
            "num_canonical_nodes 64 x nodes), world 2 on one node (LOCAL_WORLD_SIZE=2): rank 1 runs the same "
            "epochs in a partner process at the same time (streaming needs a process group and meets its local "
            "ranks at a barrier each epoch), rank 0 measured; StreamingDataLoader(batch_size=64, num_workers=0): "
            "workers fail under filelock 4 ('inherited across fork'); torchvision's CUDA wheel imported with its "
            "two op schemas declared first (see define_torchvision_schemas)"
        ),
    }
    for peer, out in peers.items():
        notes[peer] += f"; versions {out['versions']}"
    return notes


if __name__ == "__main__":
    _args = parse_args()
    if _args.peer:
        peer_main(_args.peer)
        sys.exit(0)
    report = main()
    print(json.dumps(report))
    if _args.check and not all(report["targets_met"].values()):
        sys.exit(1)
