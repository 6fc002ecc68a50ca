"""Data sets by name: the IDX reader on files the test writes, the registry's errors, Fashion-MNIST where Debian's
package is installed."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from dualrate.data import DATASETS, FASHION_MNIST_DIR, DataSetMissing, load_dataset, read_idx


def write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_reads_what_was_written(tmp_path, compress):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "x", images, compress=compress)
    assert np.array_equal(read_idx(tmp_path / "x"), images)
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    write_idx(tmp_path / "y", ints, code=0x0C, compress=compress)
    out = read_idx(tmp_path / "y")
    assert np.array_equal(out, ints) and out.dtype == np.int32
    (tmp_path / "z").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "z")


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 5), ("t10k", 3)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  compress=True)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8), compress=True)
    monkeypatch.setenv("DUALRATE_FASHION_MNIST_DIR", str(tmp_path))
    x, y = load_dataset("fashion-mnist", "test")
    assert x.shape == (3, 1, 32, 32) and y.shape == (3,) and x.min() >= -1 and x.max() <= 1
    assert (x[:, :, :2] == -1).all()  # padded like MNIST
    assert DATASETS["fashion-mnist"].class_names[0] == "T-shirt/top" and len(DATASETS["fashion-mnist"].class_names) == 10


def test_a_missing_or_unknown_data_set_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALRATE_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataSetMissing, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")
    with pytest.raises(ValueError, match=r"unknown data set 'cifar'.*mnist, fashion-mnist"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="train and test"):
        load_dataset("fashion-mnist", "valid")


def test_the_debian_package_has_the_published_sizes():
    if not FASHION_MNIST_DIR.is_dir():
        if os.environ.get("CI"):
            raise AssertionError("CI must have Fashion-MNIST: scripts/install_test_tools.sh installs dataset-fashion-mnist")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    x, y = load_dataset("fashion-mnist", "train")
    xt, _ = load_dataset("fashion-mnist", "test")
    assert (len(x), len(xt)) == (60_000, 10_000) and set(y.unique().tolist()) == set(range(10))
