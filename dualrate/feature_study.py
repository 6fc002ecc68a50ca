"""What the encoder contributes, by noise level: validation v-loss of the light network with fresh, stale and zeroed
encoder features.

    python -m dualrate.feature_study --out docs

For each t: fresh features (tau = t), stale features from tau = t + gap for the gaps that K = 4, 8, 16 leave at
32 steps (z_tau drawn from q(z_tau | z_t), exactly as the sampler's reuse produces them), and zeroed features.
"""

from __future__ import annotations

from dualrate.research import require_research_extra

require_research_extra("dualrate.feature_study")  # before the imports that need it: one line, not a traceback

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dualrate.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from dualrate.data import load_mnist
from dualrate.diffusion import CosineSchedule, q_forward, q_sample, v_target
from dualrate.provenance import command_line, provenance

T_LEVELS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
GAPS = {"stale K=4 (gap 3/32)": 3 / 32, "stale K=8 (gap 7/32)": 7 / 32, "stale K=16 (gap 15/32)": 15 / 32}


@torch.no_grad()
def study(checkpoint: Path, n: int = 500, seed: int = 0) -> dict[str, list[float]]:
    m = load_checkpoint(checkpoint)
    sched = CosineSchedule(m.cfg.logsnr_min, m.cfg.logsnr_max)
    x, y = load_mnist("valid")
    x, y = x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {"t": list(T_LEVELS), "fresh (K=1)": [], **{k: [] for k in GAPS}, "zeroed": []}
    for t_val in T_LEVELS:
        t = torch.full((n,), t_val)
        eps = torch.randn(x.shape, generator=g)
        z_t = q_sample(x, t, sched, eps)
        target = v_target(x, eps, t, sched)

        def loss(tau: torch.Tensor, feats: tuple[torch.Tensor, ...], z_t=z_t, t=t, target=target) -> float:
            return F.mse_loss(m.denoiser(z_t, t, tau, y, *feats), target).item()

        out["fresh (K=1)"].append(loss(t, m.encoder(z_t, t, y)))
        for name, gap in GAPS.items():
            tau = (t + gap).clamp(max=1.0)
            z_tau = q_forward(z_t, t, tau, sched, torch.randn(x.shape, generator=g))
            out[name].append(loss(tau, m.encoder(z_tau, tau, y)))
        out["zeroed"].append(loss(t, tuple(torch.zeros(n, *s) for s in m.cfg.feature_shapes)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("docs"))
    a = p.parse_args(argv)
    res = study(a.checkpoint, a.num_images)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "feature_study.json").write_text(json.dumps(res, indent=2) + "\n")
    command = command_line("python -m dualrate.feature_study", argv)
    (a.out / "feature_study.provenance.json").write_text(json.dumps(provenance(a.checkpoint, command), indent=2) + "\n")
    keys = [k for k in res if k != "t"]
    lines = ["| t | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for i, t in enumerate(res["t"]):
        lines.append(f"| {t:.2f} | " + " | ".join(f"{res[k][i]:.4f}" for k in keys) + " |")
    table = "\n".join(lines)
    (a.out / "feature_study.md").write_text(
        "# Validation v-loss of the light network by noise level\n\n"
        "Raw output: [feature_study.json](feature_study.json); date, machine, commit and checkpoint hash: "
        "[feature_study.provenance.json](feature_study.provenance.json).\n\n"
        f"`python -m dualrate.feature_study --num-images {a.num_images} --out {a.out}` "
        f"({a.num_images} MNIST validation digits, conditional).\n\n" + table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot(res["t"], res[k], "o-", label=k)
    ax.set_yscale("log")
    ax.set_xlabel("t (noise level of z_t)")
    ax.set_ylabel("validation v-MSE")
    ax.set_title("Light network with fresh, stale and zeroed encoder features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out / "feature_study.png", dpi=120)
    print(table)


if __name__ == "__main__":
    main()
