"""PNG encoding of the service's pictures (answers and stream previews), fast enough for the event loop.

A PNG of an 8-bit grayscale or RGB picture is three chunks around one zlib stream (PNG spec, sections 5 and 11):
IHDR (size, bit depth, colour type), IDAT (each row prefixed by its filter type, 0 = none, deflated), IEND. Pillow
writes the same format with more Python per call (plug-in look-up, tiling) around the same zlib work; for a 28x28
picture, `python -m timeit` (best of 5) on this project's 2-core machine: 6 us here against 21 us for a mostly black
digit, 23 against 76 us for noise (docs/runs/service_bench.md has the command). At a preview every 4 steps of every
streamed request that was event-loop time taken from the tick loop. Decoders (Pillow, browsers) read both alike; tests/service/test_png.py
checks the round trip through Pillow.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPE = {2: 0, 3: 2}  # array rank -> PNG colour type: (H, W) grayscale, (H, W, 3) RGB
ZLIB_LEVEL = 6  # zlib's default; files within 1% of Pillow's for 28x28 (tests/service/test_png.py allows 10%)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img: np.ndarray) -> bytes:
    """uint8 picture, (H, W) grayscale or (H, W, 3) RGB -> PNG file bytes."""
    if img.dtype != np.uint8 or img.ndim not in COLOR_TYPE or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"encode_png takes uint8 (H, W) or (H, W, 3) pictures, not {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    rows = np.zeros((h, 1 + img[0].size), np.uint8)  # filter byte 0 (none) before each row
    rows[:, 1:] = img.reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, 8, COLOR_TYPE[img.ndim], 0, 0, 0)
    data = rows.tobytes()
    # A window no larger than the data (deflate cannot refer back further) keeps zlib's working memory at ~10 KB for
    # a 28x28 picture instead of ~270 KB allocated and touched anew per call.
    wbits = min(15, max(9, (len(data) - 1).bit_length()))
    z = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, wbits, max(1, wbits - 7))
    idat = z.compress(data) + z.flush()
    return b"".join((SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def encode_pngs(images: list[np.ndarray]) -> list[str]:
    """uint8 pictures -> base64 PNGs of the same mode (the JSON answers' `png_base64`)."""
    return [base64.b64encode(encode_png(img)).decode("ascii") for img in images]
