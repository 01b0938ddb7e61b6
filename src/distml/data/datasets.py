"""Named data sets: Fashion-MNIST (downloaded, checksummed) and scikit-learn's digits (offline).

`get_dataset(name, workspace, data_dir=None)` returns the splits as sources plus what a
model needs to know (class names, image shape, the standard preprocessing). Fashion-MNIST
comes from a local folder (`data_dir`) or the official files, downloaded once into the
workspace and verified by size and MD5 either way.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distml.data.download import RemoteFile, fetch_files, locate_files
from distml.data.preprocess import Compose, Normalize, Resize, Step
from distml.data.sources import ArraySource, IdxSource, Source
from distml.errors import DistmlError

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
    return Dataset("fashion-mnist", splits, FASHION_MNIST_CLASSES, (28, 28), preprocess, uri, serving=serving)


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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
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
        "sklearn:load_digits",
        {"original_shape": (8, 8), "seed": seed, "test_fraction": test_fraction},
        # Served digits are 28x28 images of 0..255 pixels: the 0..16 range maps onto 0..255 and
        # the bilinear resize commutes with the (affine) normalisation.
        serving=pixel_serving((28, 28), DIGITS_MEAN, DIGITS_STD),
    )


DATASETS: dict[str, Callable[..., Dataset]] = {"fashion-mnist": fashion_mnist, "digits": digits}


def get_dataset(name: str, workspace: Any, data_dir: str | Path | None = None, progress: bool = True) -> Dataset:
    if name not in DATASETS:
        raise DistmlError(f"unknown data set {name!r}; expected one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name](workspace, data_dir, progress=progress)


def dataset_fingerprint(name: str, workspace: Any, data_dir: str | Path | None = None) -> str:
    """A content fingerprint of data set `name`'s source data, cheap enough to check on every run.

    Digits: the file scikit-learn bundles, read without importing scikit-learn (about 3 s),
    with the split's settings. Other data sets: the fingerprints of their split sources.
    """
    if name == "digits":
        import importlib.util

        spec = importlib.util.find_spec("sklearn")
        if spec is not None and spec.submodule_search_locations:
            bundled = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
            if bundled.is_file():
                settings = inspect.signature(digits).parameters
                split = f"test_fraction={settings['test_fraction'].default},seed={settings['seed'].default}"
                return f"digits:{hashlib.sha256(bundled.read_bytes()).hexdigest()}:{split}"
    ds = get_dataset(name, workspace, data_dir, progress=False)
    return ",".join(f"{split}={source.fingerprint()}" for split, source in sorted(ds.splits.items()))


def prepare_dataset(name: str, workspace: Any, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Locate or download `name`, fill the preprocessed cache of each split and record each as a
    data set snapshot; return one row per split (records, fingerprint, cache key, snapshot id)."""
    from distml.data.loader import Loader
    from distml.ops import lineage
    from distml.ops.metadata import record_dataset

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
