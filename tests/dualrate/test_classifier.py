"""The evaluator's classifiers: two architectures per data set, trained, saved and loaded back as what they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualrate.classifier import CLASSIFIER_DIR, DigitClassifier, GapClassifier, classifier_dir, load_classifier, train
from tests.dualrate.test_datasets import write_idx

pytestmark = pytest.mark.slow  # trains a network


def test_each_architecture_trains_on_a_data_set_and_loads_back_as_itself(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 300, dtype=np.uint8), compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 40, dtype=np.uint8), compress=True)
    monkeypatch.setenv("DUALRATE_FASHION_MNIST_DIR", str(tmp_path))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    for arch, cls in (("cnn", DigitClassifier), ("gap", GapClassifier)):
        info = train(tmp_path / arch, epochs=1, dataset="fashion-mnist", arch=arch)
        assert info["kind"] == arch and info["dataset"] == "fashion-mnist" and info["held_out"] == "last 30 of train"
        net = load_classifier(tmp_path / arch)
        assert type(net) is cls and not net.training
        assert net.features(x).shape == (4, 128) and net(x).shape == (4, 10)
        assert json.loads((tmp_path / arch / "classifier.json").read_text())["kind"] == arch
        with np.load(tmp_path / arch / "test_stats.npz") as stats:  # the test split's FID statistics, beside it
            assert stats["mu"].shape == (128,) and stats["cov"].shape == (128, 128)
    # Different architectures: different feature spaces for the same images.
    a, b = load_classifier(tmp_path / "cnn").features(x), load_classifier(tmp_path / "gap").features(x)
    assert not torch.allclose(a, b)


def test_classifier_folders_and_the_shipped_ones():
    assert classifier_dir("mnist") == CLASSIFIER_DIR
    assert classifier_dir("fashion-mnist", "gap").name == "fashion-mnist-classifier-gap"
    assert type(load_classifier(CLASSIFIER_DIR)) is DigitClassifier  # its json predates "kind": the cnn
    for dataset in ("mnist", "fashion-mnist"):
        for arch, cls in (("cnn", DigitClassifier), ("gap", GapClassifier)):
            info = json.loads((classifier_dir(dataset, arch) / "classifier.json").read_text())
            assert type(load_classifier(classifier_dir(dataset, arch))) is cls
            assert info["valid_accuracy"] > (0.97 if dataset == "mnist" else 0.85), info
    with pytest.raises(FileNotFoundError, match=r"python -m dualrate\.classifier"):
        load_classifier(classifier_dir("fashion-mnist", "nothing"))
