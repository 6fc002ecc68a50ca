"""Evaluator sanity: real held-out digits score far better than noisy or blurred ones."""

import pytest
import torch
import torch.nn.functional as F

from dualrate.data import load_mnist
from dualrate.eval import Evaluator

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


def test_a_second_evaluator_reuses_the_test_split_statistics_unless_the_classifier_changed(ev, held_out, tmp_path,
                                                                                          monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    import dualrate.eval.fid as evaluate

    again = Evaluator()
    assert all(again.refs[a][1] is ev.refs[a][1] and again.refs[a][2] is ev.refs[a][2] for a in ev.spaces)
    assert again.fid(held_out[0][:500]) == ev.fid(held_out[0][:500])
    # A retrained `cnn` classifier (here: one weight nudged) is not served the old statistics.
    real = evaluate.classifier_dir("mnist", "cnn")
    other = tmp_path / "cnn"
    shutil.copytree(real, other)
    weights = load_file(str(other / "classifier.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, str(other / "classifier.safetensors"))
    monkeypatch.setattr(evaluate, "classifier_dir", lambda d, arch="cnn": other if arch == "cnn" else real.parent /
                        f"{d}-classifier-{arch}")
    retrained = Evaluator()
    assert retrained.refs["gap"][1] is ev.refs["gap"][1]
    assert retrained.refs["cnn"][1] is not ev.refs["cnn"][1]
    assert not (retrained.refs["cnn"][1] == ev.refs["cnn"][1]).all()


def _row(model, steps, k, fid, std, gflops):
    from dualrate.eval import SweepRow

    return SweepRow(steps, k, 1.5, fid, 0.99, 0, gflops, 1.0, model=model, fid_std=std, fids=[fid - std, fid + std])


def test_comparisons_find_the_cheapest_matching_row_and_judge_by_the_spread():
    from dualrate.eval import comparisons

    dual = [_row("dual-rate", 32, 1, 10.2, 0.4, 17.1), _row("dual-rate", 32, 4, 10.4, 0.3, 4.6),
            _row("dual-rate", 32, 8, 11.5, 0.3, 2.5)]
    large = _row("mnist-standalone-large", 32, 1, 10.0, 0.5, 16.7)
    out = comparisons([*dual, large, _row("mnist-standalone-small", 32, 1, 14.0, 0.5, 4.9)], 32, 1.5)
    assert "N = 32, K = 4" in out[0] and f"**{16.7 / 4.6:.2f}x**" in out[0]  # K = 8 is cheaper but outside one std
    assert "+3.60 below it, lower by more than the spread" in out[1]
    close = comparisons([*dual, _row("mnist-standalone-small", 32, 1, 10.6, 0.5, 4.9)], 32, 1.5)
    assert "not lower by more than the spread" in close[0]
    beyond = comparisons([*dual, _row("mnist-standalone-large", 32, 1, 8.0, 0.5, 16.7)], 32, 1.5)
    assert "no dual-rate row reaches its FID" in beyond[0]


def test_sweep_with_seed_sets_and_baselines_end_to_end(tmp_path, monkeypatch):
    """The evaluator's command on tiny random checkpoints: every row on disjoint seed sets (mean and std of the
    per-set FIDs), the baseline swept over steps with FLOPs from its one network, the plot and the comparison."""
    import json

    import numpy as np

    from dualrate.eval import main, seed_set_starts
    from dualrate.init import init_checkpoint
    from dualrate.nets import per_image_flops

    pair = init_checkpoint("tiny", tmp_path / "pair", seed=1)
    card = json.loads((pair / "model_card.json").read_text())
    card["defaults"]["steps"] = 8  # rows over N/4 .. 2N of the default steps: 2-16 here (8-64 for the shipped N = 32)
    (pair / "model_card.json").write_text(json.dumps(card))
    large = init_checkpoint("tiny", tmp_path / "tiny-standalone-large", seed=2, standalone="large")
    assert seed_set_starts(10_000, 20, 3) == [10_000, 10_020, 10_040]
    main(["--checkpoint", str(pair), "--num-images", "20", "--seed-sets", "2", "--baselines", str(large),
          "--out", str(tmp_path / "out"), "--update-baseline-cards"])
    assert torch.is_grad_enabled()  # the command left autograd as it found it
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert all(len(r["fids"]) == 2 and r["fids"][0] != r["fids"][1] for r in rows)
    for r in rows:
        assert r["fid"] == pytest.approx(np.mean(r["fids"])) and r["fid_std"] == pytest.approx(np.std(r["fids"], ddof=1))
    base = [r for r in rows if r["model"] == "tiny-standalone-large"]
    assert [r["steps"] for r in base] == [2, 4, 8, 16]
    assert {r["steps"] for r in rows if r["model"] == "dual-rate"} == {4, 8, 16}
    den_f = per_image_flops(__import__("dualrate.checkpoint").checkpoint.load_checkpoint(large).cfg)[1]
    assert base[0]["gflops_per_image"] == pytest.approx(2 * 2 * den_f / 1e9)
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "Against the standalone baselines" in md and "tiny-standalone-large N = 8" in md
    assert (tmp_path / "out" / "fid_vs_flops.png").stat().st_size > 10_000
    card = json.loads((large / "model_card.json").read_text())
    assert card["quality"]["seed_sets"] == 2 and len(card["quality"]["sweep"]) == 4
    with pytest.raises(SystemExit):  # a dual-rate checkpoint is not a baseline
        main(["--checkpoint", str(pair), "--num-images", "20", "--seed-sets", "1", "--baselines", str(pair),
              "--out", str(tmp_path / "out2")])

    # --check writes under runs/evaluate unless told otherwise (never over the tracked docs), against --sweep, and
    # its report names the first seed (it once printed a literal "{a.seed}").
    sweep = tmp_path / "out" / "sweep.json"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main(["--checkpoint", str(pair), "--check", "--num-images", "20", "--ks", "4", "--sweep", str(sweep)])
    report = (work / "runs" / "evaluate" / "check.md").read_text()
    assert "first seed 10000" in report and "{" not in report.split("\n\n")[1], report
    # The same seeds as the sweep's first set, the same sampler and evaluator: that set's FID, exactly.
    assert "seed set 1 of sweep.json" in report and "| 1.000 |" in report, report
    assert sorted(p.name for p in work.rglob("*") if p.is_file()) == ["check.json", "check.md"]

    # The card's quality from the committed sweep, without sampling again; refused for other weights.
    main(["--checkpoint", str(pair), "--card-from-sweep", "--sweep", str(sweep)])
    quality = json.loads((pair / "model_card.json").read_text())["quality"]
    assert quality["seed_sets"] == 2 and quality["num_images_per_row"] == 20
    assert [r["fids"] for r in quality["sweep"]] == [r["fids"] for r in rows if r["model"] == "dual-rate"]
    with pytest.raises(SystemExit, match="other weights"):
        main(["--checkpoint", str(large), "--card-from-sweep", "--sweep", str(sweep)])


def test_a_guidance_grid_reports_each_model_at_its_best_in_both_feature_spaces_and_resumes(tmp_path, caplog):
    """--guidance / --sweep-steps / --sweep-ks on tiny random checkpoints: at each guidance, K over the card's steps
    and steps over the card's K (K above N left out) plus the zeroed control, FID in both classifiers' feature spaces,
    the best-guidance section and the Pareto plot; a rerun of the same command samples nothing again (rows.jsonl), a
    rerun with other images per set does."""
    import json
    import logging

    from dualrate.eval import main
    from dualrate.init import init_checkpoint

    pair = init_checkpoint("tiny", tmp_path / "pair", seed=1)
    card = json.loads((pair / "model_card.json").read_text())
    card["defaults"]["steps"] = 4
    (pair / "model_card.json").write_text(json.dumps(card))
    small = init_checkpoint("tiny", tmp_path / "tiny-standalone-small", seed=3, standalone="small")
    args = ["--checkpoint", str(pair), "--num-images", "20", "--seed-sets", "2", "--baselines", str(small),
            "--out", str(tmp_path / "out"), "--guidance", "1,2", "--sweep-steps", "2,4,8", "--sweep-ks", "1,4"]
    main(args)
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    dual = [(r["steps"], r["encoder_interval"], r["guidance_scale"]) for r in rows if r["model"] == "dual-rate"]
    # K = 1, 4 at N = 4; N = 8 at K = 4 (N = 2 < K left out, N = 4 once); the zeroed control at the card's steps.
    assert sorted(dual, key=str) == sorted([(4, 1, g) for g in (1.0, 2.0)] + [(4, 4, g) for g in (1.0, 2.0)]
                                           + [(8, 4, g) for g in (1.0, 2.0)] + [(4, None, g) for g in (1.0, 2.0)], key=str)
    base = {(r["steps"], r["guidance_scale"]) for r in rows if r["model"] == "tiny-standalone-small"}
    assert base == {(s, g) for s in (2, 4, 8) for g in (1.0, 2.0)}
    assert all(r["fid_gap"] is not None and len(r["fids_gap"]) == 2 and r["fid_gap"] != r["fid"] for r in rows)
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "Each model at its best guidance" in md and "In the `cnn` feature space" in md and "In the `gap` feature" in md
    assert "come out the same way in both feature spaces" in md
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    lines = (tmp_path / "out" / "rows.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)

    caplog.set_level(logging.INFO, logger="dualrate.eval")
    main(args)  # the same command again: every row kept, nothing sampled
    assert (tmp_path / "out" / "rows.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / "out" / "sweep.json").read_text()) == rows
    assert sum("kept from" in r.message for r in caplog.records) == len(rows)
    # --kept-only on a larger grid: the kept rows reported, the new guidance's rows listed as missing, none sampled.
    caplog.clear()
    grid = (tmp_path / "out" / "samples_grid.png").read_bytes()
    main([*args[:-6], "--guidance", "1,2,3", *args[-4:], "--kept-only"])
    assert (tmp_path / "out" / "rows.jsonl").read_text().splitlines() == lines
    assert (tmp_path / "out" / "samples_grid.png").read_bytes() == grid
    assert len(json.loads((tmp_path / "out" / "sweep.json").read_text())) == len(rows)
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "Reported " in md and "--kept-only: every row was measured by an earlier run" in md and "Measured " not in md
    assert f"## Not measured yet ({len(rows) // 2} of the grid's {len(rows) * 3 // 2} rows)" in md
    assert "- dual-rate, N = 4, K = zeroed, guidance 3" in md and "- tiny-standalone-small, N = 8, guidance 3" in md
    assert "guidance 1\n" not in md.split("Not measured yet")[1]
    main([*args, "--steps-k", "1", "--kept-only"])  # the steps rows at K = 1 instead of the card's K = 4
    missing = (tmp_path / "out" / "sweep.md").read_text().split("Not measured yet")[1]
    assert "- dual-rate, N = 8, K = 1, guidance 1\n" in missing and "- dual-rate, N = 2, K = 1, guidance 2\n" in missing
    with pytest.raises(SystemExit):  # nothing kept at other settings: a clear error, not an empty report
        main([*args[:3], "7", *args[4:], "--kept-only"])
    main([*args[:3], "10", *args[4:]])  # other images per set: measured again, not reused
    assert len((tmp_path / "out" / "rows.jsonl").read_text().splitlines()) == 2 * len(rows)


def test_best_guidance_takes_each_points_lowest_fid_in_the_space_asked():
    from dualrate.eval import SweepRow, best_guidance, comparisons

    def row(model, g, fid, gap, k=4, steps=32, gflops=4.6):
        return SweepRow(steps, k, g, fid, 0.9, 8, gflops, 1.0, model=model, fid_std=0.2, fid_gap=gap, fid_gap_std=0.1)

    rows = [row("dual-rate", 1.0, 12.0, 3.0), row("dual-rate", 1.5, 10.0, 4.0), row("dual-rate", 2.0, 11.0, 2.5),
            row("dual-rate", 1.0, 9.0, 2.0, k=1, gflops=17.1),
            row("x-standalone-small", 1.0, 14.0, 2.4, k=1, gflops=4.9), row("x-standalone-small", 2.0, 13.0, 2.9, k=1, gflops=4.9)]
    cnn = {(r.model, r.encoder_interval): r.guidance_scale for r in best_guidance(rows, "cnn")}
    gap = {(r.model, r.encoder_interval): r.guidance_scale for r in best_guidance(rows, "gap")}
    assert cnn == {("dual-rate", 4): 1.5, ("dual-rate", 1): 1.0, ("x-standalone-small", 1): 2.0}
    assert gap == {("dual-rate", 4): 2.0, ("dual-rate", 1): 1.0, ("x-standalone-small", 1): 1.0}
    # The comparisons read the space asked: dual-rate lower beyond the spread in cnn, not in gap.
    (c,) = comparisons(best_guidance(rows, "cnn"), 32, None, "cnn")
    (g,) = comparisons(best_guidance(rows, "gap"), 32, None, "gap")
    assert "+3.00 below it, lower by more than the spread" in c and "at guidance 1.5" in c
    assert "-0.10 below it, not lower by more than the spread" in g
    # Matched FID against a large model: a saving where the matching dual-rate row is cheaper, "more" where it is not.
    large = [row("x-standalone-large", 1.0, 9.1, 2.0, k=1, gflops=8.35), row("dual-rate", 1.5, 9.2, 2.0, k=1, gflops=17.1),
             row("dual-rate", 1.5, 12.0, 2.0, k=4, gflops=4.6)]
    (m,) = comparisons(large, 32, None, "cnn")
    assert "K = 1" in m and "**2.05x more** (no saving) FLOPs" in m, m
    (m,) = comparisons([*large[:1], row("dual-rate", 1.5, 9.0, 2.0, k=2, gflops=4.175)], 32, None, "cnn")
    assert "**2.00x** fewer FLOPs" in m, m


def test_fashion_mnist_evaluator_tells_real_from_degraded_in_both_feature_spaces():
    """The Fashion-MNIST evaluator (its own classifiers, its test split): held-out training pictures (the last 2000,
    which the classifiers did not train on) score far better than noisy or blurred ones in both feature spaces."""
    from dualrate.data import load_dataset

    ev = Evaluator(dataset="fashion-mnist")
    assert ev.spaces == ["cnn", "gap"]
    x, y = load_dataset("fashion-mnist", "train")
    x, y = x[-2000:], y[-2000:]
    real = ev.fids(x)
    noisy = ev.fids((x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    blurred = ev.fids(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    for space in ev.spaces:
        assert real[space] < 0.25 * noisy[space] and real[space] < 0.25 * blurred[space], (space, real, noisy, blurred)
    assert real["cnn"] != real["gap"]
    assert ev.accuracy(x, y) > 0.85


def test_reference_statistics_are_kept_on_disk_for_other_processes(ev, tmp_path, monkeypatch):
    """A new process (here: the in-process cache emptied) reads the statistics the first one wrote, without running
    the classifier; the file is keyed by the weights and the test images (here the split's first 1000: the same path
    at a tenth of the classifier's work)."""
    import numpy as np

    import dualrate.eval.fid as fid
    from dualrate.classifier import batched

    x, y = load_mnist("test")
    monkeypatch.setattr(fid, "load_dataset", lambda dataset, split: (x[:1000], y[:1000]))
    monkeypatch.setenv("DUALRATE_FID_CACHE", str(tmp_path))
    monkeypatch.setattr(fid, "SHIPPED_STATS", "none-shipped.npz")  # as for a classifier trained before they were
    monkeypatch.setattr(fid, "_REFERENCE_STATS", {})
    mu, cov = fid.reference_stats("mnist", "cnn", ev.net)
    (kept,) = tmp_path.glob("mnist-cnn-*.npz")
    expected = fid.feature_stats(batched(ev.net.features, x[:1000]))
    assert (mu == expected[0]).all() and (cov == expected[1]).all()

    def no_classifier(*args, **kwargs):
        raise AssertionError("the classifier ran although the statistics were on disk")

    monkeypatch.setattr(fid, "_REFERENCE_STATS", {})
    monkeypatch.setattr(fid, "batched", no_classifier)
    again = fid.reference_stats("mnist", "cnn", ev.net)
    assert (again[0] == mu).all() and (again[1] == cov).all()
    kept.write_bytes(b"half a file")  # a damaged file is measured again, not trusted, and written anew
    monkeypatch.setattr(fid, "_REFERENCE_STATS", {})
    monkeypatch.setattr(fid, "batched", batched)
    again = fid.reference_stats("mnist", "cnn", ev.net)
    assert (again[0] == mu).all() and (again[1] == cov).all()
    with np.load(kept) as rewritten:
        assert (rewritten["mu"] == mu).all()
    monkeypatch.setattr(fid, "load_dataset", lambda dataset, split: (x[1:1001], y[1:1001]))  # other images: other key
    monkeypatch.setattr(fid, "_REFERENCE_STATS", {})
    other = fid.reference_stats("mnist", "cnn", ev.net)
    assert len(list(tmp_path.glob("mnist-cnn-*.npz"))) == 2 and not (other[0] == mu).all()


def test_shipped_statistics_are_those_of_the_shipped_classifiers_and_a_stale_file_is_not_trusted(tmp_path,
                                                                                                 monkeypatch):
    """Each shipped classifier carries its test split's statistics (a fresh clone measures nothing): their key is the
    sha256 of those weights and that split, so a retrained classifier (here: a file of another key beside it) is
    measured afresh instead of being served the old ones."""
    import shutil

    import numpy as np

    import dualrate.eval.fid as fid
    from dualrate.classifier import ARCHS, classifier_dir, load_classifier
    from dualrate.data import load_dataset

    for dataset in ("mnist", "fashion-mnist"):
        x, _ = load_dataset(dataset, "test")
        for arch in ARCHS:
            folder = classifier_dir(dataset, arch)
            key = fid.stats_key((folder / "classifier.safetensors").read_bytes(), x)
            assert fid.read_stats(folder / fid.SHIPPED_STATS, key) is not None, (dataset, arch)

    monkeypatch.setenv("DUALRATE_FID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "_REFERENCE_STATS", {})
    real = classifier_dir("mnist", "gap")
    shutil.copytree(real, tmp_path / "gap")
    with np.load(real / fid.SHIPPED_STATS) as shipped:
        assert not (tmp_path / "cache").exists()
        used = fid.reference_stats("mnist", "gap", load_classifier(real))
        assert (used[0] == shipped["mu"]).all() and (used[1] == shipped["cov"]).all()
        assert not (tmp_path / "cache").exists(), "the shipped statistics were measured again"
        stale = tmp_path / "gap" / fid.SHIPPED_STATS
        fid.write_stats(stale, "0" * 64, shipped["mu"] + 1.0, shipped["cov"])
    monkeypatch.setattr(fid, "classifier_dir", lambda d, arch="cnn": tmp_path / "gap")
    monkeypatch.setattr(fid, "_REFERENCE_STATS", {})
    measured = fid.reference_stats("mnist", "gap", load_classifier(real))
    assert (measured[0] == used[0]).all() and (measured[1] == used[1]).all()
    assert list((tmp_path / "cache").glob("mnist-gap-*.npz")), "the stale file was trusted"
