"""Named data sets: Fashion-MNIST through its real download path (on generated files) and digits."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest

from distml.core.errors import DistmlError
from distml.data import Loader
from distml.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, digits, fashion_mnist, get_dataset
from distml.data.download import RemoteFile
from distml.data.idx import write_idx


def test_published_checksums_are_the_official_ones():
    table = {f.name: (f.size, f.md5) for f in FASHION_MNIST_FILES}
    assert table["train-images-idx3-ubyte.gz"] == (26_421_880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d")
    assert table["train-labels-idx1-ubyte.gz"] == (29_515, "25c81989df183df01b3e8a0aad5dffbe")
    assert table["t10k-images-idx3-ubyte.gz"] == (4_422_102, "bef4ecab320f06d8554ea6380940ec79")
    assert table["t10k-labels-idx1-ubyte.gz"] == (5_148, "bb300cfdad3c16e7a12a480ee83cd310")
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


@pytest.fixture
def fake_fashion(tmp_path):
    """Fashion-MNIST-shaped IDX files (fewer images) and their size/MD5 table."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(120) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(30) % 10).astype(np.uint8),
    }
    table = []
    for name, array in arrays.items():
        write_idx(folder / name, array)
        data = (folder / name).read_bytes()
        table.append(RemoteFile(name, len(data), hashlib.md5(data).hexdigest()))
    return folder, tuple(table), arrays


@pytest.fixture
def http_mirror(fake_fashion):
    folder = fake_fashion[0]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fashion_mnist_downloads_verifies_and_loads(workspace, fake_fashion, http_mirror, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    _, table, arrays = fake_fashion
    ds = fashion_mnist(workspace, files=table, base_urls=[http_mirror], progress=False)
    assert (workspace.datasets_dir / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()
    assert len(ds.splits["train"]) == 120 and len(ds.splits["test"]) == 30
    batch = next(
        iter(Loader(ds.splits["train"], batch_size=16, preprocess=ds.preprocess, shuffle=False, with_index=True))
    )
    expected = (arrays["train-images-idx3-ubyte.gz"][:16] / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(batch["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    # the second call finds verified files in the workspace and needs no server
    again = fashion_mnist(workspace, files=table, base_urls=["http://127.0.0.1:9/"], progress=False)
    assert again.splits["train"].fingerprint() == ds.splits["train"].fingerprint()


def test_fashion_mnist_from_a_local_folder(workspace, fake_fashion):
    folder, table, _ = fake_fashion
    ds = fashion_mnist(workspace, folder, files=table)
    assert len(ds.splits["train"]) == 120
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupt")
    with pytest.raises(DistmlError, match="t10k-labels-idx1-ubyte.gz"):
        fashion_mnist(workspace, folder, files=table)


def test_fashion_mnist_offline_error_names_files_and_places(workspace, tmp_path):
    with pytest.raises(DistmlError) as info:
        fashion_mnist(workspace, base_urls=["http://127.0.0.1:9/"], progress=False)
    message = str(info.value)
    for f in FASHION_MNIST_FILES:
        assert f.name in message
    assert "--data-dir" in message and str(workspace.datasets_dir / "fashion-mnist") in message


def test_digits_split_is_fixed_and_preprocessed_to_28x28(workspace):
    a, b = digits(workspace), get_dataset("digits", workspace)
    assert len(a.splits["train"]) == 1437 and len(a.splits["test"]) == 360
    assert a.splits["train"].fingerprint() == b.splits["train"].fingerprint()
    batch = next(iter(Loader(a.splits["train"], batch_size=32, preprocess=a.preprocess)))
    assert tuple(batch["image"].shape) == (32, 28, 28) and batch["image"].dtype.is_floating_point
    assert abs(float(batch["image"].mean())) < 0.5
    with pytest.raises(DistmlError, match="unknown data set 'mnist'"):
        get_dataset("mnist", workspace)
