"""Model cards from sweeps: a card's quality section from a committed sweep, without sampling again."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dualrate.checkpoint import CARD_FILE, checkpoint_hash, weights_hash


def sweep_images_per_row(prov: dict) -> int | None:
    """Images per row and seed set of a sweep, from its provenance (recorded since 2026-11-30; else its command)."""
    m = re.search(r"--num-images (\d+)", prov.get("command", ""))
    return prov.get("num_images_per_row") or (int(m.group(1)) if m else None)


def card_from_sweep(checkpoint: Path, sweep: Path) -> None:
    """The model card's quality from a committed sweep (its dual-rate rows, mean and spread over the seed sets), when
    the sweep's provenance says it sampled these weights: refreshing the card needs no new hour of sampling."""
    prov_path = sweep.with_name(sweep.stem + ".provenance.json")
    prov = json.loads(prov_path.read_text())
    # Newer sweeps record the weights' hash; older ones the whole checkpoint's (weights + card), which still matches
    # while the card has not been rewritten since.
    same = (prov["weights_sha256"] == weights_hash(checkpoint) if "weights_sha256" in prov
            else prov.get("checkpoint_sha256") == checkpoint_hash(checkpoint))
    if not same:
        raise SystemExit(f"{sweep} was measured on other weights than {checkpoint}'s ({prov_path}): run the sweep "
                         "again (make evaluate) instead")
    per_row = sweep_images_per_row(prov)
    rows = [r for r in json.loads(sweep.read_text()) if r.get("model", "dual-rate") == "dual-rate"]
    card_path = checkpoint / CARD_FILE
    card = json.loads(card_path.read_text())
    card["quality"] = {"measured": prov["date"][:10], "num_images_per_row": per_row,
                       "seed_sets": len(rows[0].get("fids") or [0]), "source": f"{sweep} (commit {prov['git_commit'][:12]}, "
                       f"{prov['command']})", "sweep": rows}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{card_path}: {len(rows)} rows from {sweep} ({card['quality']['seed_sets']} seed sets, measured "
          f"{card['quality']['measured']})")
