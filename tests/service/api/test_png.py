"""service.png: the PNGs the service answers with decode (Pillow) to exactly the pictures that were encoded."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.png import encode_png, encode_pngs


@pytest.mark.parametrize("shape", [(28, 28), (1, 1), (5, 7), (64, 64, 3), (3, 200, 3), (300, 300)])
def test_a_png_decodes_to_the_same_pixels_and_mode(shape):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    back = Image.open(io.BytesIO(encode_png(img)))
    assert back.mode == ("L" if img.ndim == 2 else "RGB")
    assert np.array_equal(np.asarray(back), img)


def test_a_mostly_black_digit_compresses_like_pillows():
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255
    ours = encode_png(img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    assert len(ours) <= 1.1 * len(buf.getvalue())


def test_base64_list_round_trips():
    imgs = [np.full((4, 4), v, np.uint8) for v in (0, 128, 255)]
    for b64, img in zip(encode_pngs(imgs), imgs, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))), img)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)])
def test_other_pictures_are_refused(bad):
    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)
