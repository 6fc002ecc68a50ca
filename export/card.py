"""The model card of a model folder in a model repository, read strictly: every field known, every value allowed, or
one line per problem naming the field and what is allowed. Nothing in a card is silently ignored.

Formats: "onnx" (encoder.onnx + denoiser.onnx) and "torch-export" (encoder.pt2 + denoiser.pt2) declare their I/O
contract in the card (`ModelCard`); "dualrate" (this project's own networks: encoder.safetensors, denoiser.safetensors,
a `config` the networks are built from) is checked for what the service's sampler does with it (`dualrate_problems`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from dualrate.diffusion import CosineSchedule

FORMATS = {"onnx": ("encoder.onnx", "denoiser.onnx"), "torch-export": ("encoder.pt2", "denoiser.pt2"),
           "dualrate": ("encoder.safetensors", "denoiser.safetensors")}
PREDICTIONS = ("v", "eps", "x0")
TIME_INPUTS = ("t", "logsnr")
SCHEDULES = ("cosine",)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# Fields a card may carry beside the contract: descriptive, never read by the sampler.
METADATA = frozenset({"name", "description", "license", "source", "quality", "data", "training", "flops_per_forward",
                      "method", "kind"})


class CardError(ValueError):
    """The card breaks the contract: `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Sample:
    channels: int
    height: int
    width: int
    output_height: int
    output_width: int


@dataclass(frozen=True)
class Classes:
    count: int
    null_label: int
    names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Diffusion:
    schedule: str
    logsnr_min: float
    logsnr_max: float
    prediction: str
    time_input: str


@dataclass(frozen=True)
class EncoderIO:
    z: str
    time: str
    label: str | None
    outputs: tuple[str, ...]

    def inputs(self) -> list[str | None]:
        """Its input names in the contract's call order (z, time, label); None for an unconditional model's label."""
        return [self.z, self.time, self.label]


@dataclass(frozen=True)
class DenoiserIO:
    z: str
    time: str
    encoder_time: str
    label: str | None
    features: tuple[str, ...]
    output: str

    def inputs(self) -> list[str | None]:
        """Its input names in the contract's call order (z, time, encoder_time, label, features...); None for an
        unconditional model's label."""
        return [self.z, self.time, self.encoder_time, self.label, *self.features]


@dataclass(frozen=True)
class Defaults:
    steps: int
    encoder_interval: int
    guidance_scale: float


@dataclass(frozen=True)
class ModelCard:
    """What the service serves a model by, whatever its format: its geometry, classes, diffusion, the two networks'
    I/O names and its defaults. A "dualrate" card's is derived from its `config` (`model_spec`)."""

    format: str
    sample: Sample
    classes: Classes | None  # None: an unconditional model (no label inputs, no guidance)
    diffusion: Diffusion
    encoder: EncoderIO
    denoiser: DenoiserIO
    defaults: Defaults

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W): one sample as the networks see it."""
        return (self.sample.channels, self.sample.height, self.sample.width)

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the delivered picture: the centred crop of a sample."""
        return (self.sample.output_height, self.sample.output_width)

    @property
    def num_classes(self) -> int:
        """0 for an unconditional model."""
        return self.classes.count if self.classes else 0

    @property
    def null_label(self) -> int:
        """The label of the unconditional branch (an unconditional model's rows all carry it; its networks take no
        label, so its value is never seen)."""
        return self.classes.null_label if self.classes else 0

    @property
    def class_names(self) -> list[str] | None:
        return list(self.classes.names) if self.classes and self.classes.names else None

    def schedule(self) -> CosineSchedule:
        return CosineSchedule(self.diffusion.logsnr_min, self.diffusion.logsnr_max)

    def time_feed(self, t: Tensor) -> Tensor:
        """What the networks' time inputs receive for time t (1 = noise, 0 = data): t itself, or its log-SNR."""
        return t if self.diffusion.time_input == "t" else self.schedule().logsnr(t)


class _Reader:
    """Reads a nested dict field by field, collecting one line per problem (the dotted path, what is allowed)."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def obj(self, d: Any, path: str, required: set[str], optional: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
        if not isinstance(d, dict):
            self.problems.append(f"{path}: must be an object with {', '.join(sorted(required | optional))}")
            return {}
        for k in sorted(required - set(d)):
            self.problems.append(f"{path}.{k}: missing (required)")
        for k in sorted(set(d) - required - set(optional)):
            self.problems.append(f"{path}.{k}: unknown field (allowed: {', '.join(sorted(required | set(optional)))})")
        return d

    def int_(self, d: dict, key: str, path: str, minimum: int = 1) -> int:
        v = d.get(key)
        if key in d and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
            self.problems.append(f"{path}.{key}: must be an integer >= {minimum}, not {v!r}")
            return minimum
        return v if isinstance(v, int) else minimum

    def num(self, d: dict, key: str, path: str) -> float:
        v = d.get(key)
        if key in d and (not isinstance(v, int | float) or isinstance(v, bool)):
            self.problems.append(f"{path}.{key}: must be a number, not {v!r}")
            return 0.0
        return float(v) if isinstance(v, int | float) else 0.0

    def choice(self, d: dict, key: str, path: str, allowed: tuple[str, ...]) -> str:
        v = d.get(key)
        if key in d and v not in allowed:
            self.problems.append(f"{path}.{key}: {v!r} is not one of {', '.join(map(repr, allowed))}")
        return v if isinstance(v, str) else ""

    def name(self, d: dict, key: str, path: str) -> str:
        v = d.get(key)
        if key in d and (not isinstance(v, str) or not v):
            self.problems.append(f"{path}.{key}: must be a tensor name (a non-empty string), not {v!r}")
        return v if isinstance(v, str) else ""

    def names(self, d: dict, key: str, path: str) -> tuple[str, ...]:
        v = d.get(key)
        if key in d and (not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v)):
            self.problems.append(f"{path}.{key}: must be a non-empty list of tensor names, not {v!r}")
            return ()
        return tuple(v) if isinstance(v, list) else ()


def read_model_card(card: dict[str, Any]) -> ModelCard:
    """The contract of an "onnx" or "torch-export" card; CardError with one line per problem."""
    r = _Reader()
    fmt = card.get("format")
    if fmt not in ("onnx", "torch-export"):
        raise CardError([f"format: {fmt!r} is not one of 'onnx', 'torch-export' (a card of this project's own "
                         "networks says 'dualrate')"])
    conditional = "classes" in card
    top = r.obj(card, "card", {"format", "sample", "diffusion", "encoder", "denoiser", "defaults"},
                {"classes"} | METADATA)
    s = r.obj(top.get("sample", {}), "sample", {"channels", "height", "width", "output_height", "output_width"})
    sample = Sample(*(r.int_(s, k, "sample") for k in ("channels", "height", "width", "output_height", "output_width")))
    if s and sample.channels not in (1, 3):
        r.problems.append(f"sample.channels: 1 (grayscale) or 3 (RGB), not {sample.channels}")
    for out, full in (("output_height", "height"), ("output_width", "width")):
        o, f = getattr(sample, out), getattr(sample, full)
        if s and (o > f or (f - o) % 2):
            r.problems.append(f"sample.{out}: must be <= {full} ({f}) and crop as many pixels from each side")
    classes = None
    if conditional:
        c = r.obj(top["classes"], "classes", {"count", "null_label"}, {"names"})
        count, null = r.int_(c, "count", "classes"), r.int_(c, "null_label", "classes", minimum=0)
        names = c.get("names")
        if names is not None and (not isinstance(names, list) or len(names) != count
                                  or not all(isinstance(n, str) for n in names)):
            r.problems.append(f"classes.names: must be a list of {count} strings (one per class)")
            names = None
        if c and 0 <= null < count:
            r.problems.append(f"classes.null_label: {null} is a class (0-{count - 1}); the unconditional label is "
                              "another value, e.g. count")
        classes = Classes(count, null, tuple(names) if names else None)
    d = r.obj(top.get("diffusion", {}), "diffusion", {"schedule", "prediction", "time_input"})
    sch = r.obj(d.get("schedule", {}), "diffusion.schedule", {"kind", "logsnr_min", "logsnr_max"})
    diffusion = Diffusion(r.choice(sch, "kind", "diffusion.schedule", SCHEDULES),
                          r.num(sch, "logsnr_min", "diffusion.schedule"), r.num(sch, "logsnr_max", "diffusion.schedule"),
                          r.choice(d, "prediction", "diffusion", PREDICTIONS),
                          r.choice(d, "time_input", "diffusion", TIME_INPUTS))
    if sch and diffusion.logsnr_min >= diffusion.logsnr_max:
        r.problems.append("diffusion.schedule.logsnr_min: must be below logsnr_max")
    label_keys = {"label"} if conditional else set()
    e = r.obj(top.get("encoder", {}), "encoder", {"inputs", "outputs"})
    ei = r.obj(e.get("inputs", {}), "encoder.inputs", {"z", "time"} | label_keys)
    encoder = EncoderIO(r.name(ei, "z", "encoder.inputs"), r.name(ei, "time", "encoder.inputs"),
                        r.name(ei, "label", "encoder.inputs") if conditional else None,
                        r.names(e, "outputs", "encoder"))
    n = r.obj(top.get("denoiser", {}), "denoiser", {"inputs", "output"})
    di = r.obj(n.get("inputs", {}), "denoiser.inputs", {"z", "time", "encoder_time", "features"} | label_keys)
    denoiser = DenoiserIO(r.name(di, "z", "denoiser.inputs"), r.name(di, "time", "denoiser.inputs"),
                          r.name(di, "encoder_time", "denoiser.inputs"),
                          r.name(di, "label", "denoiser.inputs") if conditional else None,
                          r.names(di, "features", "denoiser.inputs"), r.name(n, "output", "denoiser"))
    if encoder.outputs and denoiser.features and len(encoder.outputs) != len(denoiser.features):
        r.problems.append(f"denoiser.inputs.features: {len(denoiser.features)} names for the encoder's "
                          f"{len(encoder.outputs)} outputs (passed in order, one each)")
    df = r.obj(top.get("defaults", {}), "defaults", {"steps", "encoder_interval", "guidance_scale"})
    defaults = Defaults(r.int_(df, "steps", "defaults"), r.int_(df, "encoder_interval", "defaults"),
                        r.num(df, "guidance_scale", "defaults"))
    if df and defaults.guidance_scale < 0:
        r.problems.append("defaults.guidance_scale: must be >= 0")
    if df and not conditional and defaults.guidance_scale != 1.0:
        r.problems.append("defaults.guidance_scale: an unconditional model (no classes) takes no guidance: 1.0")
    if r.problems:
        raise CardError(r.problems)
    return ModelCard(fmt, sample, classes, diffusion, encoder, denoiser, defaults)


# What this project's sampler does with a "dualrate" card (dualrate.sampler): a card that says otherwise would be
# sampled wrongly without a word.
DUALRATE_SCHEDULE = {"kind": "cosine-logsnr", "prediction": "v", "process": "variance-preserving", "sampler": "ancestral"}


# The fields of a "dualrate" card: what this project's trainer, distiller and evaluator write (and `format`).
DUALRATE_FIELDS = frozenset({"format", "config", "schedule", "defaults", "defaults_note", "distilled", "quality",
                             "flops_per_forward"}) | METADATA
DEFAULTS_FIELDS = ("steps", "encoder_interval", "guidance_scale")


def dualrate_problems(card: dict[str, Any]) -> list[str]:
    """One line per field of a "dualrate" card (this project's networks) that the service would not honour."""
    out = []
    fmt = card.get("format", "dualrate")
    if fmt != "dualrate":
        out.append(f"format: {fmt!r}: a card with encoder.safetensors/denoiser.safetensors says 'dualrate'")
    for k in sorted(set(card) - DUALRATE_FIELDS):
        out.append(f"{k}: unknown field of a 'dualrate' card (allowed: {', '.join(sorted(DUALRATE_FIELDS))}); a "
                   "model of another kind is served as format 'onnx' or 'torch-export' (docs/own-model.md)")
    defaults = card.get("defaults", {})
    if not isinstance(defaults, dict):
        out.append("defaults: must be an object")
    else:
        for k in sorted(set(defaults) - set(DEFAULTS_FIELDS)):
            out.append(f"defaults.{k}: unknown field (allowed: {', '.join(DEFAULTS_FIELDS)})")
    schedule = card.get("schedule")
    if schedule is None:
        return out
    if not isinstance(schedule, dict):
        return [*out, "schedule: must be an object"]
    allowed = {*DUALRATE_SCHEDULE, "logsnr_min", "logsnr_max"}
    for k in sorted(set(schedule) - allowed):
        out.append(f"schedule.{k}: unknown field (allowed: {', '.join(sorted(allowed))})")
    for k, want in DUALRATE_SCHEDULE.items():
        if k in schedule and schedule[k] != want:
            out.append(f"schedule.{k}: {schedule[k]!r} is not what this project's networks are sampled with "
                       f"({want!r}); a model of another kind is served as format 'onnx' or 'torch-export' "
                       "(docs/own-model.md)")
    config = card.get("config") or {}
    for k in ("logsnr_min", "logsnr_max"):
        if k in schedule and k in config and float(schedule[k]) != float(config[k]):
            out.append(f"schedule.{k}: {schedule[k]} disagrees with config.{k} ({config[k]}), which the sampler uses")
    return out


def dualrate_spec(card: dict[str, Any]) -> ModelCard:
    """The serving contract of a "dualrate" card: this project's networks exported by `export.onnx_export` (the
    names of export.contract), v-prediction, time input t, the cosine schedule of its config."""
    from dualrate.checkpoint import card_defaults, class_names
    from dualrate.config import ModelConfig
    from export.contract import FEATURE_NAMES

    problems = dualrate_problems(card)
    try:
        cfg = ModelConfig.from_dict(card.get("config") or {})
    except (TypeError, ValueError, KeyError) as e:
        problems.append(f"config: {e}")
    if problems:
        raise CardError(problems)
    d = card_defaults(card)
    names = class_names(card)
    s = cfg.image_size
    return ModelCard(
        "dualrate", Sample(cfg.channels, s, s, cfg.output_size, cfg.output_size),
        Classes(cfg.num_classes, cfg.null_label, tuple(names) if names else None),
        Diffusion("cosine", cfg.logsnr_min, cfg.logsnr_max, "v", "t"),
        EncoderIO("z", "tau", "label", FEATURE_NAMES),
        DenoiserIO("z", "t", "tau", "label", FEATURE_NAMES, "v"),
        Defaults(d.steps, d.encoder_interval, d.guidance_scale))


def model_spec(card: dict[str, Any]) -> ModelCard:
    """The serving contract of a card of any format; CardError with one line per problem."""
    if not isinstance(card, dict):
        raise CardError(["model_card.json: must be a JSON object"])
    fmt = card.get("format", "dualrate")
    if fmt == "dualrate":
        return dualrate_spec(card)
    return read_model_card(card)


def read_spec(folder: Path) -> ModelCard:
    """A model folder's serving contract, after its files and card are checked (`model_folder_problems`)."""
    problems = model_folder_problems(Path(folder))
    if problems:
        raise CardError(problems)
    return model_spec(json.loads((Path(folder) / "model_card.json").read_text()))


def model_folder_problems(folder: Path) -> list[str]:
    """The folder and its card, for any format: one line per problem ([] when the card holds)."""
    card_path = folder / "model_card.json"
    if not card_path.is_file():
        return [f"{folder}: no model_card.json"]
    if not NAME.match(folder.name):
        return [f"{folder.name}: a model's name (its folder's) is [a-z0-9][a-z0-9._-]*"]
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        return [f"model_card.json: not JSON ({e})"]
    fmt = card.get("format", "dualrate") if isinstance(card, dict) else None
    if fmt not in FORMATS:
        return [f"format: {fmt!r} is not one of {', '.join(map(repr, FORMATS))}"]
    missing = [f for f in FORMATS[fmt] if not (folder / f).is_file()]
    problems = [f"{f}: missing (format {fmt!r} needs {' and '.join(FORMATS[fmt])})" for f in missing]
    if fmt == "dualrate":
        return problems + dualrate_problems(card)
    try:
        read_model_card(card)
    except CardError as e:
        problems += e.problems
    return problems
