"""The export contract of each network: input/output names, shapes (batch is dynamic) and dtypes."""

from __future__ import annotations

from dataclasses import dataclass

from dualrate.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # without the leading dynamic batch axis
    dtype: str  # numpy dtype name


@dataclass(frozen=True)
class NetworkContract:
    name: str  # "encoder" | "denoiser"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


FEATURE_NAMES = ("feat0", "feat1", "feat2")


def contracts(cfg: ModelConfig, float_dtype: str = "float32") -> dict[str, NetworkContract]:
    z = cfg.sample_shape
    feats = tuple(TensorSpec(n, shape, float_dtype) for n, shape in zip(FEATURE_NAMES, cfg.feature_shapes, strict=True))
    encoder = NetworkContract(
        "encoder",
        (TensorSpec("z", z, float_dtype), TensorSpec("tau", (), float_dtype), TensorSpec("label", (), "int64")),
        feats,
    )
    denoiser = NetworkContract(
        "denoiser",
        (TensorSpec("z", z, float_dtype), TensorSpec("t", (), float_dtype), TensorSpec("tau", (), float_dtype),
         TensorSpec("label", (), "int64"), *feats),
        (TensorSpec("v", z, float_dtype),),
    )
    return {"encoder": encoder, "denoiser": denoiser}
