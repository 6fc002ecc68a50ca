"""Export both networks to ONNX, check them against PyTorch, and cache them by checkpoint hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from dualrate.checkpoint import LoadedModel, checkpoint_hash, load_checkpoint
from export.atomic import staged_folder
from export.contract import NetworkContract, contracts

log = logging.getLogger("export")
OPSET = 17  # within every recent TensorRT parser (TENSORRT_NOTES: opset 17-20)
_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ONNX_CACHE = _ROOT / "artifacts" / "onnx"
# What the graphs are made from besides the weights: when any of these files or the opset change, the cache key does.
EXPORT_SOURCES = ("export/onnx_export.py", "export/contract.py", "dualrate/nets.py", "dualrate/config.py")
PARITY_BATCHES = (1, 3, 8)
TOLERANCE = {"float32": 2e-3, "float16": 5e-2}  # max |onnx - torch| relative to max |torch|


class ExportParityError(RuntimeError):
    """The ONNX graph disagrees with PyTorch beyond tolerance."""


@dataclass(frozen=True)
class OnnxArtifacts:
    directory: Path
    encoder: Path
    denoiser: Path
    sidecar: dict

    @staticmethod
    def load(directory: Path) -> OnnxArtifacts:
        side = json.loads((directory / "onnx.json").read_text())
        return OnnxArtifacts(directory, directory / side["encoder"]["file"], directory / side["denoiser"]["file"], side)


def onnx_cache_root() -> Path:
    """`DUALRATE_ONNX_CACHE`, read when called (not at import), else artifacts/onnx in the repository."""
    return Path(os.environ.get("DUALRATE_ONNX_CACHE") or DEFAULT_ONNX_CACHE)


def export_key(checkpoint: Path) -> str:
    """sha256 over the checkpoint's hash, the opset and the source of the export and network code."""
    h = hashlib.sha256(f"checkpoint={checkpoint_hash(Path(checkpoint))};opset={OPSET}".encode())
    for rel in EXPORT_SOURCES:
        h.update(rel.encode())
        h.update((_ROOT / rel).read_bytes())
    return h.hexdigest()


def onnx_dir_for(checkpoint: Path, root: Path | None = None) -> Path:
    """The one place that names a checkpoint's export folder: <root or DUALRATE_ONNX_CACHE>/<export key[:16]>.
    The Docker build exports there and the runtime looks there."""
    return (root if root is not None else onnx_cache_root()) / export_key(checkpoint)[:16]


class _DenoiserWrapper(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, z, t, tau, label, f0, f1, f2):
        return self.m(z, t, tau, label, f0, f1, f2)


def sample_inputs(c: NetworkContract, batch: int, null_label: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + batch)
    out = {}
    for spec in c.inputs:
        dt = getattr(torch, spec.dtype)
        if spec.dtype == "int64":
            out[spec.name] = torch.randint(0, null_label + 1, (batch,), generator=g)
        elif spec.shape == ():
            out[spec.name] = torch.rand(batch, generator=g).to(dt)
        else:
            out[spec.name] = torch.randn(batch, *spec.shape, generator=g).to(dt)
    return out


def _export_one(module: torch.nn.Module, c: NetworkContract, path: Path, null_label: int) -> None:
    args = tuple(sample_inputs(c, 2, null_label).values())
    names_in = [s.name for s in c.inputs]
    names_out = [s.name for s in c.outputs]
    torch.onnx.export(
        module, args, str(path), input_names=names_in, output_names=names_out, opset_version=OPSET,
        dynamic_axes={n: {0: "batch"} for n in names_in + names_out}, dynamo=False, do_constant_folding=True,
    )
    onnx.checker.check_model(str(path))


def check_parity(module: torch.nn.Module, c: NetworkContract, path: Path, null_label: int, dtype: str) -> float:
    """Run the graph in ONNX Runtime (CPU) against PyTorch at several batch sizes; raise past tolerance."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in PARITY_BATCHES:
        inputs = sample_inputs(c, b, null_label)
        with torch.no_grad():
            ref = module(*inputs.values())
        ref = ref if isinstance(ref, tuple | list) else (ref,)
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        for spec, r, o in zip(c.outputs, ref, got, strict=True):
            r = r.float().numpy()
            if o.shape != r.shape:
                raise ExportParityError(f"{c.name}.{spec.name}: shape {o.shape} != torch {r.shape} at batch {b}")
            err = float(np.abs(o.astype(np.float32) - r).max() / max(1e-6, np.abs(r).max()))
            worst = max(worst, err)
            if not err <= TOLERANCE[dtype]:
                raise ExportParityError(
                    f"{c.name}.{spec.name} at batch {b}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}; "
                    "the ONNX graph does not match PyTorch - do not serve it"
                )
    return worst


def _cached(out: Path, key: str, fp16: bool) -> OnnxArtifacts | None:
    """The export in `out` if it is complete and of this export key."""
    side_path = out / "onnx.json"
    if not side_path.is_file():
        return None
    side = json.loads(side_path.read_text())
    names = ("encoder", "denoiser")
    files_ok = all((out / side[n]["file"]).is_file() for n in names) and (
        not fp16 or ("fp16" in side and all((out / side["fp16"][n]["file"]).is_file() for n in names)))
    return OnnxArtifacts.load(out) if side.get("export_key") == key and files_ok else None


def writable_folder(folder: Path) -> bool:
    """Whether `folder` exists (created if need be) and takes a file: a read-only root says no."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def export_onnx(checkpoint: Path, out: Path | None = None, fp16: bool = False, force: bool = False) -> OnnxArtifacts:
    """Export (or reuse, when the checkpoint hash matches) encoder.onnx, denoiser.onnx and onnx.json."""
    checkpoint = Path(checkpoint)
    defaulted = out is None
    out = Path(out) if out is not None else onnx_dir_for(checkpoint)
    digest = checkpoint_hash(checkpoint)
    key = export_key(checkpoint)
    if not force and (done := _cached(out, key, fp16)) is not None:
        log.info("ONNX graphs for checkpoint %s (export key %s) already in %s", digest[:12], key[:12], out)
        return done
    if defaulted and not writable_folder(out.parent):
        # A read-only image serving a checkpoint it was not built with: export into the temp folder (the container's
        # tmpfs) instead of failing on the baked-in cache.
        fallback = Path(tempfile.gettempdir()) / "dualrate-onnx" / out.name
        log.warning("the ONNX cache %s is not writable (a read-only root?): exporting to %s instead; set "
                    "DUALRATE_ONNX_CACHE to a writable folder (a volume) to keep the export across restarts",
                    out.parent, fallback)
        out = fallback
        if not force and (done := _cached(out, key, fp16)) is not None:
            return done
    model: LoadedModel = load_checkpoint(checkpoint)
    # Staged, then moved in (onnx.json last): a shared cache volume or a kill mid-export never leaves half a graph.
    with staged_folder(out, "onnx.json") as stage:
        t0 = time.perf_counter()
        log.info("exporting %s to %s (export key %s)", checkpoint, out, key[:12])
        sidecar: dict = {"checkpoint": str(checkpoint), "checkpoint_sha256": digest, "export_key": key, "opset": OPSET,
                         "torch": torch.__version__, "dynamic_axes": {"batch": 0}}
        variants = [("float32", "")] + ([("float16", "_fp16")] if fp16 else [])
        for dtype, suffix in variants:
            cs = contracts(model.cfg, dtype)
            for name, module in (("encoder", model.encoder), ("denoiser", _DenoiserWrapper(model.denoiser))):
                module = module.eval().to(getattr(torch, dtype))
                path = stage / f"{name}{suffix}.onnx"
                _export_one(module, cs[name], path, model.cfg.null_label)
                err = check_parity(module, cs[name], path, model.cfg.null_label, dtype)
                entry = {"file": path.name, **asdict(cs[name]), "max_rel_error_vs_torch": err,
                         "parity_batches": list(PARITY_BATCHES)}
                if suffix:
                    sidecar.setdefault("fp16", {})[name] = entry
                else:
                    sidecar[name] = entry
                log.info("exported %s (%s): max relative error vs PyTorch %.1e", path.name, dtype, err)
                module.float()
        sidecar["export_seconds"] = round(time.perf_counter() - t0, 2)
        (stage / "onnx.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return OnnxArtifacts.load(out)
