"""ONNX Runtime backend: the embedded default on a machine without a GPU.

Runs any model folder's encoder.onnx + denoiser.onnx by the tensor names its model card gives (export/card.py): a
foreign "onnx" model in place, this project's own checkpoints as exported by `export.onnx_export`.

CPU execution provider here; CUDA or TensorRT execution providers where onnxruntime-gpu has them, with I/O binding
so tensors stay on the device. On CPU the encoder runs on its own worker thread (see `Engine.encode_async`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engines.base import Backend, BackendUnavailable, Engine, EngineError, EngineInfo, Features, Precision
from export.card import ModelCard

log = logging.getLogger("engines.onnxruntime")

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        onnx_dir: Path,
        spec: ModelCard,
        device: str = "cpu",
        max_batch: int = 64,
        intra_op_threads: int = 0,  # 0 = ONNX Runtime's default (all cores)
        providers: list[str] | None = None,
        spin: bool = False,  # let idle ORT threads spin (faster alone, slower when two sessions run at once)
    ) -> None:
        super().__init__()
        import os

        # onnxruntime (1.2x on Linux) sends usage telemetry and persists a device id under $HOME, which a read-only
        # container cannot write ("Failed to persist telemetry device ID" at every start). A serving process does
        # neither unless the operator sets ORT_DISABLE_TELEMETRY=0.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        self.spec = spec
        self.sample_shape = spec.sample_shape
        self.max_batch = max_batch
        self._device = device
        available = ort.get_available_providers()
        if providers is None:
            if device.startswith("cuda"):
                providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
                if not providers:
                    raise BackendUnavailable(
                        f"device {device} asked for, but this onnxruntime has only {available}: install onnxruntime-gpu"
                    )
            providers = [*(providers or []), "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        if device == "cpu" and not spin:
            # The encoder (worker thread) and the light network run concurrently on CPU; spinning thread pools
            # would steal each other's cores.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._enc = ort.InferenceSession(str(Path(onnx_dir) / "encoder.onnx"), opts, providers=providers)
            self._den = ort.InferenceSession(str(Path(onnx_dir) / "denoiser.onnx"), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineError(f"ONNX Runtime could not load the graphs in {onnx_dir}: {e}") from e
        self._providers = tuple(self._enc.get_providers())
        self._enc_out = list(spec.encoder.outputs)
        self._den_out = [spec.denoiser.output]
        self.feature_shapes = self.probe_feature_shapes()
        log.info("onnxruntime sessions on %s (providers %s)", device, ", ".join(self._providers))

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(Backend.ONNXRUNTIME, self._device, Precision.FP32, self._providers, self.max_batch)

    @property
    def device(self) -> str:
        return self._device

    def _run(self, sess, feeds: dict[str, Tensor], names: list[str], out_shapes: list[tuple[int, ...]] | None) -> list[Tensor]:
        if self._device == "cpu" or out_shapes is None:
            outs = sess.run(names, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return [torch.from_numpy(o).to(self._device) for o in outs]
        # GPU: bind torch tensors in place, so nothing crosses to the host.
        binding = sess.io_binding()
        dev_id = torch.device(self._device).index or 0
        for k, v in feeds.items():
            v = v.contiguous()
            binding.bind_input(k, "cuda", dev_id, _NP[str(v.dtype).removeprefix("torch.")], tuple(v.shape), v.data_ptr())
        outs = [torch.empty(s, device=self._device) for s in out_shapes]
        for name, t in zip(names, outs, strict=True):
            binding.bind_output(name, "cuda", dev_id, np.float32, tuple(t.shape), t.data_ptr())
        sess.run_with_iobinding(binding)
        return outs

    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        b = z.shape[0]
        self.check_batch(b)
        shapes = getattr(self, "feature_shapes", None)  # unknown while the first call probes them
        outs = self._run(self._enc, self.encoder_feeds(z, tau, label), self._enc_out,
                         [(b, *s) for s in shapes] if shapes is not None else None)
        return tuple(outs)

    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        b = z.shape[0]
        self.check_batch(b)
        feeds = self.denoiser_feeds(z, t, tau, label, features)
        return self._run(self._den, feeds, self._den_out, [(b, *self.sample_shape)])[0]
