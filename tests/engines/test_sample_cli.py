"""`python -m engines.sample` through an engine with a batch limit: the work is cut into batches the engine takes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engines.sample import main


def test_sample_cli_cuts_work_into_engine_batches(checkpoint_dir, onnx_dir, tmp_path):
    # 40 guided images = 80 rows, more than the engine's 64: this once failed with "batch of 128 rows outside 1..64".
    main(["--checkpoint", str(checkpoint_dir), "--backend", "onnxruntime", "--num-images", "40", "--steps", "2",
          "--class-label", "5", "--seed", "3", "--out", str(tmp_path / "big")])
    assert len(list((tmp_path / "big").glob("*.png"))) == 40
    main(["--checkpoint", str(checkpoint_dir), "--backend", "onnxruntime", "--num-images", "3", "--steps", "2",
          "--class-label", "5", "--seed", "3", "--batch-size", "2", "--out", str(tmp_path / "small")])
    for seed in (3, 4, 5):  # the same image whatever the chunking
        a = np.asarray(Image.open(tmp_path / "big" / f"5_seed{seed}.png"))
        b = np.asarray(Image.open(tmp_path / "small" / f"5_seed{seed}.png"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
