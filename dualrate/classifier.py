"""The evaluator's classifiers, one pair per data set: two architectures trained independently on its training split,
their penultimate layers the two FID feature spaces, the first one's logits the class accuracy.

    python -m dualrate.classifier --dataset fashion-mnist --arch cnn   # -> checkpoints/fashion-mnist-classifier
    python -m dualrate.classifier --dataset fashion-mnist --arch gap   # -> checkpoints/fashion-mnist-classifier-gap

- `cnn`: five 3x3 convolutions with max pooling, a 128-d fully connected layer (the feature space), a linear head.
- `gap`: strided convolutions with batch norm, global average pooling to 128 channels (the feature space), a linear
  head: no max pooling and no fully connected layer over positions, so its features weigh where things are differently.

Each classifier's folder also keeps its test split's FID statistics (`test_stats.npz`, written after training;
`--stats-only` rewrites them for a classifier already there).

A claim about FID counts where both feature spaces agree beyond their spread (docs/model.md).
"""

from __future__ import annotations

from dualrate.research import require_research_extra

require_research_extra("dualrate.classifier")  # before the imports that need it: one line, not a traceback

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from dualrate.data import DATASETS, load_dataset

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
CLASSIFIER_DIR = CHECKPOINTS / "mnist-classifier"
ARCHS = ("cnn", "gap")
log = logging.getLogger("dualrate.classifier")


class DigitClassifier(nn.Module):
    """`cnn`: images (B, 1, S, S) in [-1, 1] -> logits (B, 10); `features` gives the 128-d penultimate activations."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 128, 4, 4)
        )
        self.fc = nn.Linear(128 * 16, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))  # (B, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class GapClassifier(nn.Module):
    """`gap`: images (B, 1, S, S) in [-1, 1] -> logits (B, 10); `features` gives the 128-d globally pooled activations."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.convs = nn.Sequential(*block(1, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2),
                                   *block(128, self.feature_dim, 2))  # (B, 128, S/8, S/8)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.convs(x).mean((2, 3))  # (B, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


Classifier = DigitClassifier | GapClassifier
_NETS: dict[str, type[DigitClassifier] | type[GapClassifier]] = {"cnn": DigitClassifier, "gap": GapClassifier}


def classifier_dir(dataset: str, arch: str = "cnn") -> Path:
    """Where a data set's classifier of one architecture lives: checkpoints/<dataset>-classifier[-<arch>]."""
    return CHECKPOINTS / (f"{dataset}-classifier" + ("" if arch == "cnn" else f"-{arch}"))


def load_classifier(path: Path = CLASSIFIER_DIR) -> Classifier:
    weights = path / "classifier.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} missing: train it with `python -m dualrate.classifier --out {path}` "
                                "(and --dataset, --arch for another data set or architecture)")
    info_path = path / "classifier.json"
    arch = json.loads(info_path.read_text()).get("kind", "cnn") if info_path.is_file() else "cnn"
    net = _NETS[arch]()
    net.load_state_dict(load_file(str(weights)))
    return net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # with batched()


@torch.no_grad()
def batched(fn, x: Tensor, batch: int = 128) -> Tensor:
    """fn over x in batches. Channels-last batches of 128 with a channels-last net (load_classifier): 1.8-2.2x the
    speed of contiguous batches of 1000 on this CPU (1 and 2 threads; features within 1e-5 of them)."""
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def splits(dataset: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], str]:
    """Training images and held-out ones to report accuracy on: MNIST's own valid split (as the shipped classifier);
    elsewhere the last 5000 of the training split (a tenth of a smaller one), so that the test split (the FID
    reference) stays unseen."""
    x, y = load_dataset(dataset, "train")
    if "valid" in DATASETS[dataset].splits:
        return (x, y), load_dataset(dataset, "valid"), "valid split"
    n = min(5000, x.shape[0] // 10)
    return (x[:-n], y[:-n]), (x[-n:], y[-n:]), f"last {n} of train"


def train(out: Path, epochs: int = 3, seed: int = 0, dataset: str = "mnist", arch: str = "cnn") -> dict:
    torch.manual_seed(seed)
    (x, y), (xv, yv), held_out = splits(dataset)
    net = _NETS[arch]()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(x.shape[0])
        for i in tqdm(range(0, x.shape[0], 128), desc=f"{arch} classifier epoch {epoch + 1}/{epochs}", mininterval=5.0):
            idx = perm[i : i + 128]
            # Light augmentation (random shifts) makes the feature space less brittle.
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    acc = (batched(net, xv).argmax(1) == yv).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / "classifier.safetensors"))
    (out / "classifier.safetensors").chmod(0o644)
    info = {"kind": arch, "arch": ARCH_TEXT[arch], "dataset": dataset, "epochs": epochs, "valid_accuracy": acc,
            "held_out": held_out, "train_seconds": round(time.perf_counter() - t0, 1),
            "data": f"{DATASETS[dataset].licence}, train split ({x.shape[0]} images)"}
    (out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("%s classifier on %s: held-out accuracy %.4f, saved to %s", arch, dataset, acc, out)
    keep_test_stats(dataset, out)
    return info


def keep_test_stats(dataset: str, folder: Path) -> None:
    """The test split's FID statistics in this classifier's feature space, kept beside it (dualrate.eval.fid)."""
    from dualrate.eval.fid import write_test_stats  # the evaluator builds on this module, not the other way round

    log.info("test split statistics of %s kept at %s", folder, write_test_stats(dataset, folder))


ARCH_TEXT = {"cnn": "5 conv + fc(128) + head", "gap": "5 strided conv + batch norm, global average pool (128) + head"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="the data set to classify")
    p.add_argument("--arch", default="cnn", choices=ARCHS, help="the architecture (one FID feature space each)")
    p.add_argument("--out", type=Path, default=None, help="default: checkpoints/<dataset>-classifier[-<arch>]")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--stats-only", action="store_true",
                   help="train nothing: (re)write the test split's FID statistics beside the classifier already there")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = a.out or classifier_dir(a.dataset, a.arch)
    if a.stats_only:
        keep_test_stats(a.dataset, out)
    else:
        train(out, a.epochs, dataset=a.dataset, arch=a.arch)


if __name__ == "__main__":
    main()
