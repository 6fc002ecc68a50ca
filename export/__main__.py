"""Export a dual-rate checkpoint to ONNX.

    python -m export --checkpoint checkpoints/mnist-dualrate [--out DIR] [--fp16] [--force]

Writes encoder.onnx, denoiser.onnx (dynamic batch axis, named inputs/outputs) and onnx.json (names, shapes,
dtypes, opset, checkpoint hash) after checking both graphs against PyTorch at several batch sizes. The output is
cached by checkpoint hash: a second run with an unchanged checkpoint does nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dualrate.checkpoint import DEFAULT_CHECKPOINT, checkpoint_problem, read_card
from export.card import dualrate_problems
from export.onnx_export import ExportParityError, export_onnx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", type=Path, default=None, help="default: artifacts/onnx/<checkpoint hash>")
    p.add_argument("--fp16", action="store_true", help="also export FP16 graphs (for strongly typed TensorRT builds)")
    p.add_argument("--force", action="store_true", help="re-export even if the cache matches")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problem = checkpoint_problem(a.checkpoint)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    unhonoured = dualrate_problems(read_card(a.checkpoint))
    for line in unhonoured:
        print(f"error: {a.checkpoint / 'model_card.json'}: {line}", file=sys.stderr)
    if unhonoured:
        return 2
    try:
        art = export_onnx(a.checkpoint, a.out, fp16=a.fp16, force=a.force)
    except ExportParityError as e:
        logging.getLogger("export").error("%s", e)
        return 2
    print(art.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
