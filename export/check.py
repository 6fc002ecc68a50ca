"""Check a model folder against the model repository's contract: `python -m export.check MODEL_DIR`.

Prints one line per problem and exits 1, or a summary and exits 0. What it checks, for formats "onnx" and
"torch-export" (export/card.py has the card's fields):

- the card: every field known, every value allowed, the files its format needs;
- the graphs' inputs and outputs: the names the card gives exist, with the contract's dtypes (z, times float32;
  labels int64; features and the prediction float32);
- shapes at batch 1 and 3: the prediction is (B, C, H, W) of the card's sample, every feature (B, ...);
- the encoder's features are taken by the denoiser (by name, in order);
- batch independence: row i of a batch of 3 equals the same row run alone (BatchNorm in training mode, or anything
  that mixes rows, breaks it);
- finite outputs.

A "dualrate" folder (this project's own networks) gets the card's checks; its graphs are this project's export.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.card import CardError, ModelCard, model_folder_problems, read_model_card

Net = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # named inputs -> named outputs
BATCH_TOL = 1e-4  # max |row alone - row in a batch of 3|, relative to max |row|


def _onnx(path: Path) -> tuple[Net, dict[str, str], list[str]]:
    """-> (run, input name -> element type, output names) of an ONNX graph on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, sess.run(outputs, feeds), strict=True))

    return run, types, outputs


ORT_TYPES = {np.dtype("float32"): "tensor(float)", np.dtype("int64"): "tensor(int64)"}


def _torch_export(path: Path, mc: ModelCard, role: str, output_names: list[str]) -> Net:
    """A torch.export program with its inputs matched to the card's names (export.programs), its outputs named in
    the card's order."""
    import torch

    from export.programs import ExportedNetwork

    module = ExportedNetwork(path, mc, role, convert_times=False)
    roles = mc.encoder.inputs() if role == "encoder" else mc.denoiser.inputs()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(feeds[n]) if n is not None else torch.zeros(0) for n in roles]
        with torch.no_grad():
            out = module(*args)
        outs = out if isinstance(out, tuple | list) else (out,)
        if len(outs) != len(output_names):
            raise ValueError(f"returns {len(outs)} tensors, the card names {len(output_names)}")
        for name, o in zip(output_names, outs, strict=True):
            if o.dtype != torch.float32:
                raise TypeError(f"output {name} is {o.dtype}, not float32")
        return {n: o.numpy() for n, o in zip(output_names, outs, strict=True)}

    return run


def check_model(folder: Path) -> tuple[list[str], str]:
    """-> (one line per problem, a summary when there are none)."""
    problems = model_folder_problems(folder)
    if problems:
        return problems, ""
    card = json.loads((folder / "model_card.json").read_text())
    if card.get("format", "dualrate") == "dualrate":
        return [], f"{folder.name}: format dualrate, card holds (its graphs are this project's ONNX export)"
    try:
        mc = read_model_card(card)
    except CardError as e:
        return e.problems, ""
    return _check_graphs(folder, mc)


def _inputs(mc: ModelCard, b: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random encoder and denoiser inputs for a batch of b (without the features)."""
    s = mc.sample
    z = rng.standard_normal((b, s.channels, s.height, s.width)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, b).astype(np.float32)
    if mc.diffusion.time_input == "logsnr":
        t = (mc.diffusion.logsnr_max + t * (mc.diffusion.logsnr_min - mc.diffusion.logsnr_max)).astype(np.float32)
    enc: dict[str, np.ndarray] = {mc.encoder.z: z, mc.encoder.time: t}
    den: dict[str, np.ndarray] = {mc.denoiser.z: z, mc.denoiser.time: t, mc.denoiser.encoder_time: t}
    if mc.classes is not None:
        y = rng.integers(0, mc.classes.count, b).astype(np.int64)
        y[-1] = mc.classes.null_label  # the unconditional branch of guidance runs too
        enc[mc.encoder.label or ""] = y
        den[mc.denoiser.label or ""] = y
    return enc, den


def _check_graphs(folder: Path, mc: ModelCard) -> tuple[list[str], str]:
    problems: list[str] = []
    enc_inputs = [n for n in mc.encoder.inputs() if n is not None]
    den_inputs = [n for n in mc.denoiser.inputs() if n is not None]
    want_types = {mc.encoder.z: "float32", mc.encoder.time: "float32", mc.denoiser.z: "float32",
                  mc.denoiser.time: "float32", mc.denoiser.encoder_time: "float32",
                  **{f: "float32" for f in mc.denoiser.features}}
    if mc.classes is not None:
        want_types[mc.encoder.label or ""] = want_types[mc.denoiser.label or ""] = "int64"
    if mc.format == "onnx":
        nets = {}
        for role, io_in, io_out in (("encoder", enc_inputs, list(mc.encoder.outputs)),
                                    ("denoiser", den_inputs, [mc.denoiser.output])):
            try:
                run, types, outputs = _onnx(folder / f"{role}.onnx")
            except Exception as e:  # ONNX Runtime raises its own classes
                problems.append(f"{role}.onnx: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})")
                continue
            for name in io_in:
                if name not in types:
                    problems.append(f"{role}.inputs: the graph has no input {name!r} (it has {', '.join(types)})")
                elif types[name] != ORT_TYPES[np.dtype(want_types[name])]:
                    problems.append(f"{role}.inputs: {name!r} is {types[name]}, the contract says {want_types[name]}")
            for name in sorted(set(types) - set(io_in)):
                problems.append(f"{role}: the graph takes {name!r}, which the card does not name"
                                + (" (a feature the encoder does not give?)" if role == "denoiser" else ""))
            for name in io_out:
                if name not in outputs:
                    problems.append(f"{role}.outputs: the graph has no output {name!r} (it has {', '.join(outputs)})")
            nets[role] = run
        if problems:
            return problems, ""
        encode, denoise = nets["encoder"], nets["denoiser"]
    else:
        try:
            encode = _torch_export(folder / "encoder.pt2", mc, "encoder", list(mc.encoder.outputs))
            denoise = _torch_export(folder / "denoiser.pt2", mc, "denoiser", [mc.denoiser.output])
        except Exception as e:  # ProgramError, or what torch raises for a file that is not a program
            return [str(e).splitlines()[0][:300]], ""
    return _check_runs(mc, encode, denoise)


def _check_runs(mc: ModelCard, encode: Net, denoise: Net) -> tuple[list[str], str]:
    problems: list[str] = []
    s = mc.sample
    results: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    for b in (3, 1):  # batch 1 is row 0 of the batch of 3, alone
        enc_in, den_in = (({k: v[:b] for k, v in part.items()}) for part in _inputs(mc, 3, np.random.default_rng(0)))
        try:
            feats = encode(enc_in)
        except Exception as e:
            return [f"encoder: fails at batch {b} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"], ""
        for name in mc.encoder.outputs:
            f = feats[name]
            if f.dtype != np.float32:
                problems.append(f"encoder.outputs: {name!r} is {f.dtype}, the contract says float32")
            if f.ndim < 1 or f.shape[0] != b:
                problems.append(f"encoder.outputs: {name!r} has shape {f.shape} at batch {b}; the batch axis comes first")
            if not np.isfinite(f).all():
                problems.append(f"encoder.outputs: {name!r} is not finite at batch {b} (NaN or inf)")
        den_in.update({d: feats[e] for e, d in zip(mc.encoder.outputs, mc.denoiser.features, strict=True)})
        try:
            pred = denoise(den_in)[mc.denoiser.output]
        except Exception as e:
            return [*problems, f"denoiser: does not take the encoder's features at batch {b} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]})"], ""
        want = (b, s.channels, s.height, s.width)
        if tuple(pred.shape) != want:
            problems.append(f"denoiser.output: {mc.denoiser.output!r} has shape {tuple(pred.shape)} at batch {b}, the "
                            f"card's sample says {want}")
        if pred.dtype != np.float32:
            problems.append(f"denoiser.output: {mc.denoiser.output!r} is {pred.dtype}, the contract says float32")
        if not np.isfinite(pred).all():
            problems.append(f"denoiser.output: not finite at batch {b} (NaN or inf)")
        results[b] = (feats, pred)
        if problems:
            return problems, ""
        if b == 3:  # the light network reuses features of an earlier time: it must read both times
            for name in (mc.denoiser.time, mc.denoiser.encoder_time):
                moved = {**den_in, name: (den_in[name] * 0.5 + 0.25).astype(np.float32)}
                if np.array_equal(denoise(moved)[mc.denoiser.output], pred):
                    role = "time" if name == mc.denoiser.time else "encoder_time"
                    return [f"denoiser.inputs.{role}: the prediction does not change with {name!r}: the light network "
                            "must read both its time and its features' time (torch.export given one tensor for both "
                            "ties them into one input: export with two tensors)"], ""
    (feats3, pred3), (feats1, pred1) = results[3], results[1]
    for name, a, c in [*((n, feats3[n][:1], feats1[n]) for n in mc.encoder.outputs),
                       (mc.denoiser.output, pred3[:1], pred1)]:
        scale = max(float(np.abs(c).max()), 1e-6)
        err = float(np.abs(a - c).max()) / scale
        if err > BATCH_TOL:
            problems.append(f"batch independence: {name!r} of row 0 differs by {err:.2g} (relative) between a batch of "
                            "3 and the row alone: rows must not depend on each other (BatchNorm in training mode?)")
    if problems:
        return problems, ""
    shapes = ", ".join(f"{n} {tuple(feats1[n].shape[1:])}" for n in mc.encoder.outputs)
    classes = f"{mc.classes.count} classes" if mc.classes else "unconditional"
    return [], (f"ok: format {mc.format}, sample {s.channels}x{s.height}x{s.width} (delivered {s.output_height}x"
                f"{s.output_width}), {classes}, prediction {mc.diffusion.prediction}, time input "
                f"{mc.diffusion.time_input}, features {shapes}; batch 1 and 3, rows independent, outputs finite")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a model folder: model_card.json and its format's two networks")
    a = p.parse_args(argv)
    problems, summary = check_model(a.model_dir)
    for line in problems:
        print(f"{a.model_dir.name}: {line}", file=sys.stderr)
    if problems:
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def feature_shapes(folder: Path) -> list[tuple[int, ...]]:
    """The encoder's feature shapes (without the batch axis) of a model folder that passes the checks: from the config
    of a "dualrate" card, else from one encoder call at batch 1."""
    card = json.loads((Path(folder) / "model_card.json").read_text())
    if card.get("format", "dualrate") == "dualrate":
        from dualrate.config import ModelConfig

        return [tuple(s) for s in ModelConfig.from_dict(card["config"]).feature_shapes]
    mc = read_model_card(card)
    if mc.format == "onnx":
        encode, _, _ = _onnx(Path(folder) / "encoder.onnx")
    else:
        encode = _torch_export(Path(folder) / "encoder.pt2", mc, "encoder", list(mc.encoder.outputs))
    enc_in, _ = _inputs(mc, 1, np.random.default_rng(0))
    feats = encode(enc_in)
    return [tuple(feats[name].shape[1:]) for name in mc.encoder.outputs]


def per_image_state_bytes(folder: Path) -> int:
    """What one image holds in a batch slot on the device: its sample and the feature cache of its conditional and
    unconditional rows, float32."""
    card = json.loads((Path(folder) / "model_card.json").read_text())
    from export.card import model_spec

    spec = model_spec(card)
    sample = int(np.prod(spec.sample_shape))
    features = sum(int(np.prod(s)) for s in feature_shapes(folder))
    return 4 * (sample + 2 * features)
