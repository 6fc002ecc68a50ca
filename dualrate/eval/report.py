"""The sweep's report: the markdown table, the FID-against-FLOPs plots, and the comparisons with the standalone
baselines computed from the rows."""

from __future__ import annotations

import math
from pathlib import Path

from dualrate.eval.sweep import SweepRow, best_guidance


def markdown_table(rows: list[SweepRow]) -> str:
    gap = any(r.fid_gap is not None for r in rows)
    lines = ["| model | steps N | K | guidance | FID (mean ± std) |" + (" FID, gap features |" if gap else "")
             + " accuracy | encoder calls | GFLOPs/image | images/s | note |",
             "|---|---:|---:|---:|---:|" + ("---:|" if gap else "") + "---:|---:|---:|---:|---|"]
    for r in rows:
        standalone = not r.model.startswith("dual-rate")
        k = "-" if standalone else "none (zeroed)" if r.encoder_interval is None else str(r.encoder_interval)
        calls = "-" if standalone else str(r.encoder_calls)
        second = (f" {r.fid_gap:.2f} ± {r.fid_gap_std:.2f} |" if r.fid_gap is not None else " |") if gap else ""
        lines.append(f"| {r.model} | {r.steps} | {k} | {r.guidance_scale:g} | {r.fid:.2f} ± {r.fid_std:.2f} |{second} "
                     f"{100 * r.accuracy:.1f}% | {calls} | {r.gflops_per_image:.2f} | {r.images_per_s:.1f} | {r.note} |")
    return "\n".join(lines)


def _curves(rows: list[SweepRow], default_steps: int, default_g: float) -> dict[str, tuple[bool, list[SweepRow]]]:
    """The plot's curves, each sorted by FLOPs and flagged True where it runs over steps: dual-rate over K at the
    default steps, dual-rate at K = 4 over steps, and each standalone model over steps (all at the default guidance)."""
    main = [r for r in rows if r.guidance_scale == default_g]
    n = default_steps
    curves = {
        f"dual-rate, N = {n}, K = 1..{n}": (False, [
            r for r in main if r.model == "dual-rate" and r.steps == n and r.encoder_interval is not None]),
        f"dual-rate, K = 4, N = {n // 2} / {n} / {2 * n}": (
            True, [r for r in main if r.model == "dual-rate" and r.encoder_interval == 4]),
    }
    for name in dict.fromkeys(r.model for r in main if r.model != "dual-rate"):
        curves[f"{name}, N = {n // 4}..{2 * n}"] = (True, [r for r in main if r.model == name])
    return {k: (steps, sorted(v, key=lambda r: r.gflops_per_image)) for k, (steps, v) in curves.items() if v}


def plot(rows: list[SweepRow], path: Path, default_steps: int = 32, default_g: float = 1.5, title: str = "MNIST") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["o-", "s--", "^-", "v-", "D-"]
    for (label, (over_steps, sel)), style in zip(_curves(rows, default_steps, default_g).items(), styles, strict=False):
        ax.errorbar([r.gflops_per_image for r in sel], [r.fid for r in sel], yerr=[r.fid_std for r in sel],
                    fmt=style, capsize=3, label=label, markersize=5)
        for r in sel:
            if over_steps and r.model == "dual-rate" and r.steps == default_steps:
                continue  # the K = 4 point is on the K curve, labelled there
            tag = f"N={r.steps}" if over_steps else f"K={r.encoder_interval}"
            ax.annotate(tag, (r.gflops_per_image, r.fid), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("model GFLOPs per image (counted; guided: cond + uncond)")
    ax.set_ylabel(f"FID (classifier features, vs {title} test), mean ± std over seed sets")
    n_sets = max((len(r.fids) for r in rows), default=1)
    ax.set_title(f"{title}: quality vs compute, dual-rate against standalone models ({n_sets} seed sets per point)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # a grid sweep may have no row at the card's guidance
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparisons(rows: list[SweepRow], default_steps: int, default_g: float | None, space: str = "cnn") -> list[str]:
    """What the issue asks of the baselines, computed from the rows (so a rerun restates it from its own numbers), in
    one feature space: (1) per standalone-large row, the cheapest dual-rate row whose mean FID is within one standard
    deviation (the larger of the two rows' stds) of it or below, and the FLOPs ratio; (2) standalone-small at the
    default steps against the dual-rate row nearest to it in FLOPs: the FID difference against the spread. Rows at
    `default_g` only; None: the rows as given (e.g. each model at its best guidance, `best_guidance`)."""
    main = [r for r in rows if (default_g is None or r.guidance_scale == default_g) and r.encoder_interval is not None]
    dual = [r for r in main if r.model == "dual-rate"]

    def fid(r: SweepRow) -> str:
        mean, std = r.in_space(space)
        return f"FID {mean:.2f} ± {std:.2f}" + ("" if default_g is not None else f" at guidance {r.guidance_scale:g}")

    out: list[str] = []
    for r in (r for r in main if r.model.endswith("standalone-large")):
        ok = [d for d in dual if d.in_space(space)[0] <= r.in_space(space)[0] + max(r.in_space(space)[1], d.in_space(space)[1])]
        if not ok:
            out.append(f"- {r.model} N = {r.steps} ({fid(r)}, {r.gflops_per_image:.2f} GFLOPs):"
                       " no dual-rate row reaches its FID within one std.")
            continue
        d = min(ok, key=lambda d: d.gflops_per_image)
        ratio = r.gflops_per_image / d.gflops_per_image
        saving = f"**{ratio:.2f}x** fewer" if ratio >= 1 else f"**{1 / ratio:.2f}x more** (no saving)"
        out.append(f"- {r.model} N = {r.steps} ({fid(r)}, {r.gflops_per_image:.2f} GFLOPs): the "
                   f"cheapest dual-rate row within one std is N = {d.steps}, K = {d.encoder_interval} ({fid(d)}, "
                   f"{d.gflops_per_image:.2f} GFLOPs): {saving} FLOPs per image.")
    for r in (r for r in main if r.model.endswith("standalone-small") and r.steps == default_steps):
        if not dual:
            break
        d = min(dual, key=lambda d: abs(math.log(d.gflops_per_image / r.gflops_per_image)))
        (rf, rs), (df, ds) = r.in_space(space), d.in_space(space)
        spread = max(rs, ds)
        verdict = "lower by more than the spread" if rf - df > spread else "not lower by more than the spread"
        out.append(f"- {r.model} N = {r.steps} ({r.gflops_per_image:.2f} GFLOPs, {fid(r)}) against "
                   f"dual-rate N = {d.steps}, K = {d.encoder_interval} ({d.gflops_per_image:.2f} GFLOPs, {fid(d)}): "
                   f"dual-rate's FID is {rf - df:+.2f} below it, {verdict} ({spread:.2f}).")
    return out


def best_guidance_report(rows: list[SweepRow], default_steps: int, spaces: list[str]) -> str:
    """The section "each model at its best guidance": per feature space, the best rows and the comparisons from
    them, then where the two spaces agree and where they do not."""
    out = ["", "## Each model at its best guidance (per steps and K, over the guidance scales swept)", ""]
    verdicts: dict[str, list[str]] = {}
    for space in spaces:
        best = sorted(best_guidance(rows, space), key=lambda r: (r.model, r.gflops_per_image))
        out += [f"### In the `{space}` feature space", "", markdown_table(best), ""]
        verdicts[space] = comparisons(best, default_steps, None, space)
        out += verdicts[space] + [""]
    if len(spaces) > 1:
        agree = [a.split(":")[0] for a, b in zip(*verdicts.values(), strict=False)
                 if ("not lower" in a) == ("not lower" in b) and ("no dual-rate row" in a) == ("no dual-rate row" in b)]
        out += ["### Where the feature spaces agree", "",
                f"{len(agree)} of {min(map(len, verdicts.values()))} statements above come out the same way in both "
                "feature spaces (the FLOPs ratios may differ); a claim counts only where they do.", ""]
    return "\n".join(out) + "\n"


def pareto_plot(rows: list[SweepRow], path: Path, spaces: list[str], title: str) -> None:
    """FID against FLOPs per image, each model at its best guidance per point, one panel per feature space, with each
    model's Pareto front (the points no cheaper point beats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spaces), figsize=(7 * len(spaces), 5), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        best = [r for r in best_guidance(rows, space) if r.encoder_interval is not None or r.model != "dual-rate"]
        for model, marker in zip(dict.fromkeys(r.model for r in best), "os^vD", strict=False):
            pts = sorted((r for r in best if r.model == model), key=lambda r: r.gflops_per_image)
            x = [r.gflops_per_image for r in pts]
            y = [r.in_space(space)[0] for r in pts]
            ax.errorbar(x, y, yerr=[r.in_space(space)[1] for r in pts], fmt=marker, capsize=2, label=model, alpha=0.8)
            front, low = [], math.inf
            for r, fid in zip(pts, y, strict=True):
                if fid < low:
                    front.append((r.gflops_per_image, fid))
                    low = fid
            ax.plot(*zip(*front, strict=True), "-", alpha=0.5)
            for r, fid in zip(pts, y, strict=True):
                tag = f"N{r.steps}" + ("" if r.model != "dual-rate" else f" K{r.encoder_interval}") + f" g{r.guidance_scale:g}"
                ax.annotate(tag, (r.gflops_per_image, fid), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model GFLOPs per image (guided: cond + uncond)")
        ax.set_ylabel(f"FID ({space} features), best guidance, mean ± std")
        ax.set_title(f"{title}: each model at its best guidance ({space} features)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
