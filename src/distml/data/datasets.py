"""Named data sets: Fashion-MNIST (downloaded, checksummed) and scikit-learn's digits (offline).

`get_dataset(name, workspace, data_dir=None)` returns the splits as sources plus what a
model needs to know (class names, image shape, the standard preprocessing). Fashion-MNIST
comes from a local folder (`data_dir`) or the official files, downloaded once into the
workspace and verified by size and MD5 either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distml.core.errors import DistmlError
from distml.data.download import RemoteFile, fetch_files, locate_files
from distml.data.preprocess import Compose, Normalize, Resize, Step
from distml.data.sources import ArraySource, ConcatSource, IdxSource, NpzSource, Source

FASHION_MNIST_FILES = (
    RemoteFile("train-images-idx3-ubyte.gz", 26_421_880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    RemoteFile("train-labels-idx1-ubyte.gz", 29_515, "25c81989df183df01b3e8a0aad5dffbe"),
    RemoteFile("t10k-images-idx3-ubyte.gz", 4_422_102, "bef4ecab320f06d8554ea6380940ec79"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", 5_148, "bb300cfdad3c16e7a12a480ee83cd310"),
)
FASHION_MNIST_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Mean and standard deviation of the training pixels scaled to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
DIGITS_MEAN, DIGITS_STD = 0.3051, 0.4009


@dataclass
class Dataset:
    name: str
    splits: dict[str, Source]
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # shape of one record's "image" after `preprocess`
    preprocess: Step
    uri: str
    info: dict[str, Any] = field(default_factory=dict)
    #: What a served model needs to turn a client's raw image into the inputs it was trained on:
    #: {"input": {"shape", "dtype"}, "normalization": {"scale", "mean", "std"}}: `(x * scale - mean) / std`.
    serving: dict[str, Any] = field(default_factory=dict)


def pixel_serving(shape: tuple[int, ...], mean: float, std: float) -> dict[str, Any]:
    """Serving preprocessing for 8-bit images: raw 0..255 pixels, scaled to [0, 1], then normalised."""
    return {
        "input": {"shape": list(shape), "dtype": "UINT8", "range": [0, 255]},
        "normalization": {"scale": 1 / 255, "mean": mean, "std": std},
    }


def fashion_mnist(
    workspace: Any,
    data_dir: str | Path | None = None,
    *,
    files=FASHION_MNIST_FILES,
    base_urls=None,
    progress: bool = True,
) -> Dataset:
    """Fashion-MNIST from `data_dir` if given, else from the workspace, downloading what is missing."""
    if data_dir is not None:
        paths = locate_files(files, Path(data_dir))
        uri = f"file:{Path(data_dir).resolve()}"
    else:
        dest = Path(workspace.datasets_dir) / "fashion-mnist"
        mirror = os.environ.get("DISTML_FASHION_MNIST_URL")
        urls = list(base_urls or ([mirror] if mirror else FASHION_MNIST_URLS))
        paths = fetch_files(files, dest, urls, progress=progress)
        uri = urls[0]
    names = [f.name for f in files]
    train = IdxSource(paths[names[0]], paths[names[1]], name="fashion-mnist/train")
    test = IdxSource(paths[names[2]], paths[names[3]], name="fashion-mnist/test")
    preprocess = Normalize("image", mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, scale=1 / 255)
    serving = pixel_serving((28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    splits = {"train": train, "test": test}
    info = {"pixel_range": (0, 255)}
    return Dataset("fashion-mnist", splits, FASHION_MNIST_CLASSES, (28, 28), preprocess, uri, info, serving=serving)


def digits(
    workspace: Any = None,
    data_dir: str | Path | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split train/test with a fixed seed.

    The standard preprocessing scales pixels (0..16) to [0, 1], normalises and resizes them
    to 28x28 so the same models serve both data sets.
    """
    images, labels = _read_bundled_digits()
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    splits = {
        "train": ArraySource(
            {"image": images[train_idx], "label": labels[train_idx]}, chunk_rows=512, name="digits/train"
        ),
        "test": ArraySource({"image": images[test_idx], "label": labels[test_idx]}, chunk_rows=512, name="digits/test"),
    }
    preprocess = Compose(
        [Normalize("image", mean=DIGITS_MEAN, std=DIGITS_STD, scale=1 / 16), Resize("image", (28, 28))]
    )
    return Dataset(
        "digits",
        splits,
        tuple(str(d) for d in range(10)),
        (28, 28),
        preprocess,
        "sklearn:datasets/data/digits.csv.gz",
        {"original_shape": (8, 8), "seed": seed, "test_fraction": test_fraction, "pixel_range": (0, 16)},
        # Served digits are 28x28 images of 0..255 pixels: the 0..16 range maps onto 0..255 and
        # the bilinear resize commutes with the (affine) normalisation.
        serving=pixel_serving((28, 28), DIGITS_MEAN, DIGITS_STD),
    )


def _bundled_digits_file() -> Path:
    """scikit-learn's digits file, found without importing scikit-learn (which costs ~2.5 s of a
    worker's start-up): `sklearn/datasets/data/digits.csv.gz`, 64 pixels and a label per row."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DistmlError("the digits data set comes with scikit-learn; install it: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DistmlError(f"scikit-learn's digits file is missing: {path}")
    return path


def _read_bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(_bundled_digits_file(), delimiter=",", dtype=np.uint8)
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices, each class split in the data set's proportions.

    The test set has ceil(n x test_fraction) rows (as scikit-learn's `train_test_split`); each class
    gets floor(n_c x test_fraction) of them and the rest go, one each, to the classes with the
    largest remainders (ties to the smaller label). Rows are drawn per class by a seeded permutation.
    """
    if not 0 < test_fraction < 1:
        raise DistmlError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    n_test = int(np.ceil(len(labels) * test_fraction))
    exact = counts * test_fraction
    quota = np.floor(exact).astype(np.int64)
    by_remainder = np.lexsort((classes, -(exact - quota)))  # largest remainder first, then label
    quota[by_remainder[: n_test - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


DATASETS: dict[str, Callable[..., Dataset]] = {"fashion-mnist": fashion_mnist, "digits": digits}


def get_dataset(name: str, workspace: Any, data_dir: str | Path | None = None, progress: bool = True) -> Dataset:
    if name not in DATASETS:
        raise DistmlError(f"unknown data set {name!r}; expected one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](workspace, data_dir, progress=progress)


def with_train_files(ds: Dataset, paths: list[str]) -> Dataset:
    """`ds` with its train split replaced by the NumPy archives `paths` (columns `image` and
    `label`, raw pixels as the data set's own files hold them): its test split, classes and
    preprocessing stay. Continuous training trains on the snapshots of arrived data this way."""
    if not paths:
        raise DistmlError("train_files needs at least one .npz file")
    train = ConcatSource(
        [NpzSource(p, keys=["image", "label"], chunk_rows=512) for p in paths], name=f"{ds.name}/train"
    )
    return dataclasses.replace(ds, splits={**ds.splits, "train": train}, info={**ds.info, "train_files": list(paths)})


def dataset_fingerprint(name: str, workspace: Any, data_dir: str | Path | None = None) -> str:
    """A content fingerprint of data set `name`'s source data, cheap enough to check on every run.

    Digits: the file scikit-learn bundles, read without importing scikit-learn (about 3 s),
    with the split's settings. Other data sets: the fingerprints of their split sources.
    """
    if name == "digits":
        settings = inspect.signature(digits).parameters
        split = f"test_fraction={settings['test_fraction'].default},seed={settings['seed'].default},stratified"
        return f"digits:{hashlib.sha256(_bundled_digits_file().read_bytes()).hexdigest()}:{split}"
    ds = get_dataset(name, workspace, data_dir, progress=False)
    return ",".join(f"{split}={source.fingerprint()}" for split, source in sorted(ds.splits.items()))


def prepare_dataset(name: str, workspace: Any, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Locate or download `name`, fill the preprocessed cache of each split and record each as a
    data set snapshot; return one row per split (records, fingerprint, cache key, snapshot id)."""
    from distml.data.loader import Loader
    from distml.lineage import record as lineage
    from distml.lineage.store import record_dataset

    ds = get_dataset(name, workspace, data_dir, progress=True)
    rows = []
    for split, source in ds.splits.items():
        loader = Loader(
            source, batch_size=256, preprocess=ds.preprocess, cache="disk", workspace=workspace, progress=True
        )
        loader.fill_cache()
        snapshot = record_dataset(
            workspace.engine,
            name=ds.name,
            split=split,
            fingerprint=source.fingerprint(),
            num_records=len(source),
            uri=ds.uri,
            schema={"image_shape": list(ds.image_shape), "classes": list(ds.class_names)},
        )
        lineage.record_data_snapshot(  # an artifact in the lineage graph; inside a step (ingest), its output
            workspace.engine,
            name=ds.name,
            split=split,
            fingerprint=source.fingerprint(),
            uri=ds.uri,
            num_records=len(source),
            dataset_id=snapshot,
        )
        rows.append(
            {
                "split": split,
                "records": len(source),
                "fingerprint": source.fingerprint(),
                "cache_key": loader.cache_key,
                "snapshot_id": snapshot,
            }
        )
    return rows
