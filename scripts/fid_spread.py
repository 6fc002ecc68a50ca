"""FID and accuracy of one sweep row over several disjoint seed sets (800 samples each by default), for comparing
two versions of the sampler: run it in each version's checkout (PYTHONPATH=that checkout), e.g.

    git worktree add /tmp/old 8d9fcca    # before the counter-based noise
    (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/scripts/fid_spread.py --seeds 10000,20000 --out old.json)
    python scripts/fid_spread.py --seeds 10000,20000 --out new.json

Writes {seed: {fid, accuracy}} plus provenance to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dualrate.checkpoint import DEFAULT_CHECKPOINT, checkpoint_hash, load_checkpoint
from dualrate.eval import Evaluator, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mnist-dualrate"))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-images", type=int, default=800)
    p.add_argument("--seeds", required=True, help="comma-separated first seeds, e.g. 10000,20000,30000")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_checkpoint(a.checkpoint if a.checkpoint.exists() else DEFAULT_CHECKPOINT)
    d, ev, res = model.defaults, Evaluator(), {}
    for seed in (int(s) for s in a.seeds.split(",")):
        imgs, labels, _, _ = generate(model, a.num_images, d.steps, a.k, d.guidance_scale, seed=seed)
        res[seed] = {"fid": ev.fid(imgs), "accuracy": ev.accuracy(imgs, labels)}
        print(seed, res[seed], flush=True)
    a.out.write_text(json.dumps({"k": a.k, "steps": d.steps, "num_images": a.num_images,
                                 "checkpoint_sha256": checkpoint_hash(model.path), "results": res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
