"""`python -m export.check MODEL_DIR` on a foreign pair (tests/export/foreign.py) in both formats, and on planted
defects: each gives its own one-line message and exit 1."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from export.card import CardError, dualrate_problems, read_model_card
from export.check import main
from tests.export import foreign


def run(folder, capsys) -> tuple[int, list[str], str]:
    code = main([str(folder)])
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out.strip()


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_a_foreign_pair_passes_in_both_formats(tmp_path, capsys, fmt):
    folder = foreign.write_model(tmp_path / "foreign", fmt)
    code, problems, summary = run(folder, capsys)
    assert code == 0 and not problems, problems
    assert summary.startswith(f"ok: format {fmt}, sample 3x8x12 (delivered 8x10), 5 classes, prediction eps")
    assert "h_lo (6, 4, 6), h_hi (4, 8, 12)" in summary


def with_field(c: dict, path: str, value) -> dict:
    c = copy.deepcopy(c)
    *parents, last = path.split(".")
    node = c
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return c


CARD_DEFECTS = [
    ("missing field", "diffusion.prediction", None, "diffusion.prediction: missing (required)"),
    ("unknown prediction", "diffusion.prediction", "epsilon", "diffusion.prediction: 'epsilon' is not one of 'v', 'eps', 'x0'"),
    ("unknown field", "diffusion.sampler", "ddim", "diffusion.sampler: unknown field"),
    ("unknown time input", "diffusion.time_input", "sigma", "diffusion.time_input: 'sigma' is not one of 't', 'logsnr'"),
]


@pytest.mark.parametrize(("what", "path", "value", "message"), CARD_DEFECTS, ids=[d[0] for d in CARD_DEFECTS])
def test_card_defects_are_one_line_each(tmp_path, capsys, what, path, value, message):
    folder = foreign.write_model(tmp_path / "m")
    c = json.loads((folder / "model_card.json").read_text())
    (folder / "model_card.json").write_text(json.dumps(with_field(c, path, value)))
    code, problems, _ = run(folder, capsys)
    assert code == 1 and len(problems) == 1 and message in problems[0], problems


GRAPH_DEFECTS = {
    "wrong input name": (dict(card_override={"encoder": {"inputs": {"z": "x", "time": "t_in", "label": "y"},
                                                         "outputs": ["h_lo", "h_hi"]}}),
                         "encoder.inputs: the graph has no input 'x'"),
    "wrong feature shape": (dict(denoiser=foreign.Denoiser(lo_channels=5)),
                            "denoiser: does not take the encoder's features at batch 3"),
    "a feature the denoiser does not take": (
        dict(card_override={"encoder": {"inputs": {"z": "x_in", "time": "t_in", "label": "y"}, "outputs": ["h_lo", "h_hi"]},
                            "denoiser": {"inputs": {"z": "x_in", "time": "t_in", "encoder_time": "tau_in", "label": "y",
                                                    "features": ["h_lo", "h_extra"]}, "output": "eps_out"}}),
        "denoiser.inputs: the graph has no input 'h_extra'"),
    "batch-dependent output": (dict(encoder=foreign.Encoder(batch_dependent=True)),
                               "batch independence: 'h_lo' of row 0 differs"),
    "NaN output": (dict(encoder=foreign.Encoder(nan=True)), "encoder.outputs: 'h_lo' is not finite at batch 3"),
    "wrong dtype": (dict(time_dtype=torch.float64), "encoder.inputs: 't_in' is tensor(double), the contract says float32"),
    "encoder_time tied to time": (dict(fmt="torch-export", tie_times=True),
                                  "the prediction does not change with 't'"),
}


@pytest.mark.parametrize("what", list(GRAPH_DEFECTS))
def test_graph_defects_are_one_line_each(tmp_path, capsys, what):
    kwargs, message = GRAPH_DEFECTS[what]
    folder = foreign.write_model(tmp_path / "m", **kwargs)
    code, problems, _ = run(folder, capsys)
    assert code == 1 and problems and message in problems[0], problems


def test_an_unconditional_card_takes_no_labels_and_no_guidance():
    c = foreign.card(classes=None)
    del c["classes"]
    c["encoder"]["inputs"].pop("label")
    c["denoiser"]["inputs"].pop("label")
    with pytest.raises(CardError, match=r"an unconditional model .* takes no guidance"):
        read_model_card(c)
    c["defaults"]["guidance_scale"] = 1.0
    assert read_model_card(c).classes is None


def test_a_dualrate_card_whose_schedule_the_sampler_does_not_follow_is_refused(checkpoint_dir):
    card = json.loads((checkpoint_dir / "model_card.json").read_text())
    assert dualrate_problems(card) == []
    card["schedule"]["prediction"] = "epsilon"
    card["schedule"]["eta"] = 0.0
    problems = dualrate_problems(card)
    assert any(p.startswith("schedule.prediction: 'epsilon' is not what this project's networks") for p in problems)
    assert any(p.startswith("schedule.eta: unknown field") for p in problems)
    # Nothing anywhere in the card is silently ignored: a field the sampler does not read is one line.
    card = json.loads((checkpoint_dir / "model_card.json").read_text())
    card["prediction"] = "eps"
    card["defaults"]["sampler"] = "ddim"
    problems = dualrate_problems(card)
    assert any(p.startswith("prediction: unknown field of a 'dualrate' card") for p in problems), problems
    assert any(p.startswith("defaults.sampler: unknown field") for p in problems), problems


ALL_DEFECTS = {**{d[0]: ("card", d) for d in CARD_DEFECTS}, **{k: ("graph", v) for k, v in GRAPH_DEFECTS.items()}}


def planted(tmp_path, what: str):
    """-> (a model folder with defect `what`, the message the checker gives for it)."""
    kind, d = ALL_DEFECTS[what]
    if kind == "graph":
        kwargs, message = d
        return foreign.write_model(tmp_path / "m", **kwargs), message
    _, path, value, message = d
    folder = foreign.write_model(tmp_path / "m")
    c = json.loads((folder / "model_card.json").read_text())
    (folder / "model_card.json").write_text(json.dumps(with_field(c, path, value)))
    return folder, message


@pytest.mark.parametrize("what", list(ALL_DEFECTS))
def test_the_service_refuses_to_start_on_each_planted_defect(tmp_path, what, monkeypatch):
    """The settings the service starts from run the same checks: each defect is its own message."""
    from pydantic import ValidationError

    from service.settings import Settings, describe_settings_error

    folder, message = planted(tmp_path, what)
    for var in [v for v in __import__("os").environ if v.startswith("DUALRATE_")]:
        monkeypatch.delenv(var)
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=folder)
    lines = describe_settings_error(e.value)
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_python_m_service_exits_2_with_the_checkers_line(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    folder, message = planted(tmp_path, "wrong input name")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALRATE_")}
    done = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env={**env, "DUALRATE_CHECKPOINT": str(folder)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "python -m export.check" in done.stderr
