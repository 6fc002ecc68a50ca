"""FID in a data set's classifiers' feature spaces, class accuracy, and the helpers that turn served pictures
into the evaluator's input and samples into a grid."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch import Tensor

from dualrate.classifier import ARCHS, Classifier, batched, classifier_dir, load_classifier
from dualrate.data import MNIST_SAMPLE, MNIST_SIZE, load_dataset, to_uint8

log = logging.getLogger("dualrate.eval")


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    covmean = linalg.sqrtm(cov1 @ cov2)  # the same matrix as disp=False gave (checked), without its deprecation
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def dataset_of(card: dict) -> str:
    """The registered data set a model was trained on, from its card (cards written before the registry: mnist)."""
    return (card.get("data") or {}).get("name") or "mnist"


_REFERENCE_STATS: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
# Where reference_stats keeps them on disk (`DUALRATE_FID_CACHE`, else artifacts/fid_reference in the repository).
DEFAULT_FID_CACHE = Path(__file__).resolve().parents[2] / "artifacts" / "fid_reference"
# Beside each shipped classifier: its test split's statistics, written when it was trained (`python -m
# dualrate.classifier`, or `--stats-only` for one already trained), so that a fresh clone measures nothing.
SHIPPED_STATS = "test_stats.npz"


def fid_cache() -> Path:
    return Path(os.environ.get("DUALRATE_FID_CACHE") or DEFAULT_FID_CACHE)


def stats_key(weight_bytes: bytes, images: Tensor) -> str:
    """sha256 of a classifier's weights and the images its statistics are of: what a kept file must carry."""
    h = hashlib.sha256(weight_bytes)
    h.update(images.numpy().tobytes())
    return h.hexdigest()


def read_stats(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The statistics kept at `path` if they are whole and of `key` (else None: measure them again)."""
    try:
        with np.load(path) as kept:
            if str(kept["key"]) == key:
                return kept["mu"], kept["cov"]
    except (OSError, KeyError, ValueError):
        pass
    return None


def write_stats(path: Path, key: str, mu: np.ndarray, cov: np.ndarray) -> None:
    """Written whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, mu=mu, cov=cov, key=np.array(key))
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def write_test_stats(dataset: str, folder: Path) -> Path:
    """Measure the test split's statistics in the feature space of the classifier in `folder` and keep them beside
    it (SHIPPED_STATS): what `python -m dualrate.classifier` does after training."""
    weight_bytes = (folder / "classifier.safetensors").read_bytes()
    x, _ = load_dataset(dataset, "test")
    mu, cov = feature_stats(batched(load_classifier(folder).features, x))
    write_stats(folder / SHIPPED_STATS, stats_key(weight_bytes, x), mu, cov)
    return folder / SHIPPED_STATS


def reference_stats(dataset: str, arch: str, net: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the test split's features in one shipped classifier's space (~13 s each at one
    thread), looked for beside the classifier (SHIPPED_STATS), then in fid_cache(), else computed and kept there;
    kept for the process too, so that later Evaluators reuse them. A kept file counts only if it carries the sha256
    of these weights and these test images: a retrained classifier or another split is measured afresh."""
    folder = classifier_dir(dataset, arch)
    weight_bytes = (folder / "classifier.safetensors").read_bytes()
    key = (dataset, arch, hashlib.sha256(weight_bytes).hexdigest())  # a process's test split does not change
    if key not in _REFERENCE_STATS:
        x, _ = load_dataset(dataset, "test")
        digest = stats_key(weight_bytes, x)
        path = fid_cache() / f"{dataset}-{arch}-{digest[:16]}.npz"
        kept = read_stats(folder / SHIPPED_STATS, digest) or read_stats(path, digest)
        if kept is None:
            log.info("measuring the %s test split's statistics in the %s feature space (once: kept in %s)", dataset,
                     arch, path.parent)
            kept = feature_stats(batched(net.features, x))
            try:
                write_stats(path, digest, *kept)
            except OSError as e:  # a read-only checkout: computed again next time
                log.warning("could not keep the FID reference statistics at %s (%s)", path, e)
        mu, cov = kept
        mu.flags.writeable = cov.flags.writeable = False  # shared by every Evaluator that follows
        _REFERENCE_STATS[key] = mu, cov
    return _REFERENCE_STATS[key]


class Evaluator:
    """FID against a data set's test split and class accuracy, through that data set's classifiers: FID in each
    feature space found (`cnn`, the project's classifier, always; `gap`, the second architecture, where trained),
    accuracy by the `cnn` classifier."""

    def __init__(self, classifier: Classifier | None = None, dataset: str = "mnist",
                 spaces: tuple[str, ...] = ARCHS) -> None:
        self.dataset = dataset
        self.net = classifier or load_classifier(classifier_dir(dataset, "cnn"))
        nets: dict[str, Classifier] = {"cnn": self.net}
        for arch in spaces:
            if arch != "cnn" and classifier is None:
                path = classifier_dir(dataset, arch)
                if (path / "classifier.safetensors").is_file():
                    nets[arch] = load_classifier(path)
                else:
                    log.warning("no %s classifier for %s at %s: FID in one feature space only (train it with `python -m "
                                "dualrate.classifier --dataset %s --arch %s`)", arch, dataset, path, dataset, arch)
        if classifier is None:
            self.refs = {arch: (net, *reference_stats(dataset, arch, net)) for arch, net in nets.items()}
        else:  # a classifier handed in: its own statistics, never cached
            x, _ = load_dataset(dataset, "test")
            self.refs = {arch: (net, *feature_stats(batched(net.features, x))) for arch, net in nets.items()}
        self.ref_mu, self.ref_cov = self.refs["cnn"][1:]

    @property
    def spaces(self) -> list[str]:
        return list(self.refs)

    @torch.no_grad()
    def fid(self, images: Tensor) -> float:
        """Samples (B, 1, S, S) in [-1, 1] of the data set's geometry; re-quantized to uint8 as the service would serve
        them. FID in the `cnn` feature space."""
        return self.fids(images, ("cnn",))["cnn"]

    @torch.no_grad()
    def fids(self, images: Tensor, spaces: tuple[str, ...] | None = None) -> dict[str, float]:
        """FID in each feature space (or those named)."""
        x = quantize(images)
        out = {}
        for arch, (net, ref_mu, ref_cov) in self.refs.items():
            if spaces is None or arch in spaces:
                mu, cov = feature_stats(batched(net.features, x))
                out[arch] = frechet_distance(mu, cov, ref_mu, ref_cov)
        return out

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return (batched(self.net, quantize(images)).argmax(1) == labels).float().mean().item()


def quantize(images: Tensor) -> Tensor:
    """Round-trip through the served uint8 28x28 image, padded back to 32x32."""
    return from_pictures(to_uint8(images, MNIST_SIZE))


def from_pictures(pictures: np.ndarray) -> Tensor:
    """Served MNIST pictures, uint8 (B, MNIST_SIZE, MNIST_SIZE) (decoded PNGs) -> the evaluator's input, padded to
    (B, 1, MNIST_SAMPLE, MNIST_SAMPLE) in [-1, 1]."""
    u8 = torch.from_numpy(np.asarray(pictures)).float() / 127.5 - 1.0
    pad = (MNIST_SAMPLE - MNIST_SIZE) // 2
    return torch.nn.functional.pad(u8[:, None], (pad, pad, pad, pad), value=-1.0)


def save_grid(images: Tensor, path: Path, nrow: int = 10, scale: int = 2) -> None:
    """Save MNIST-geometry samples as one PNG grid of their served (MNIST_SIZE) tiles."""
    tiles = to_uint8(images, MNIST_SIZE)  # (B, 28, 28)
    rows = math.ceil(len(tiles) / nrow)
    grid = np.zeros((rows * 30, nrow * 30), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = tile
    img = Image.fromarray(grid, mode="L")
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)
