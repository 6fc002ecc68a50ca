"""Evaluator sanity: real held-out digits score far better than noisy or blurred ones."""

import pytest
import torch
import torch.nn.functional as F

from dualrate.data import load_mnist
from dualrate.evaluate import Evaluator

pytestmark = pytest.mark.slow  # real servers / training / the evaluator: `pytest -m "not slow"` skips them


@pytest.fixture(scope="module")
def ev():
    return Evaluator()


@pytest.fixture(scope="module")
def held_out():
    x, y = load_mnist("valid")
    return x[:2000], y[:2000]


def test_real_digits_score_far_better_than_noisy_or_blurred(ev, held_out):
    x, y = held_out
    real = ev.fid(x)
    noisy = ev.fid((x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    blurred = ev.fid(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    assert real < 0.25 * noisy and real < 0.25 * blurred, (real, noisy, blurred)
    assert ev.accuracy(x, y) > 0.97
    assert ev.accuracy(x, (y + 1) % 10) < 0.05


def test_fid_of_a_single_repeated_digit_is_bad(ev, held_out):
    x, _ = held_out
    assert ev.fid(x[:1].repeat(500, 1, 1, 1)) > 10 * ev.fid(x[:500])
