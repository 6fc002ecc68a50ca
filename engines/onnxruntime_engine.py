"""ONNX Runtime backend: the embedded default on a machine without a GPU.

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

log = logging.getLogger("engines.onnxruntime")

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        onnx_dir: Path,
        device: str = "cpu",
        max_batch: int = 64,
        intra_op_threads: int = 0,  # 0 = ONNX Runtime's default (all cores)
        providers: list[str] | None = None,
        spin: bool = False,  # let idle ORT threads spin (faster alone, slower when two sessions run at once)
    ) -> None:
        super().__init__()
        import json
        import os

        # onnxruntime (1.2x on Linux) sends usage telemetry and persists a device id under $HOME, which a read-only
        # container cannot write ("Failed to persist telemetry device ID" at every start). A serving process does
        # neither unless the operator sets ORT_DISABLE_TELEMETRY=0.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        side = json.loads((Path(onnx_dir) / "onnx.json").read_text())
        self.sidecar = side
        self.feature_shapes = [tuple(o["shape"]) for o in side["encoder"]["outputs"]]
        self.sample_shape = tuple(side["denoiser"]["outputs"][0]["shape"])  # v has z's shape
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
            self._enc = ort.InferenceSession(str(Path(onnx_dir) / side["encoder"]["file"]), opts, providers=providers)
            self._den = ort.InferenceSession(str(Path(onnx_dir) / side["denoiser"]["file"]), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineError(f"ONNX Runtime could not load the graphs in {onnx_dir}: {e}") from e
        self._providers = tuple(self._enc.get_providers())
        self._enc_out = [o.name for o in self._enc.get_outputs()]
        log.info("onnxruntime sessions on %s (providers %s)", device, ", ".join(self._providers))

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(Backend.ONNXRUNTIME, self._device, Precision.FP32, self._providers, self.max_batch)

    @property
    def device(self) -> str:
        return self._device

    def _run(self, sess, feeds: dict[str, Tensor], out_shapes: list[tuple[int, ...]]) -> list[Tensor]:
        if self._device == "cpu":
            outs = sess.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return [torch.from_numpy(o) for o in outs]
        # GPU: bind torch tensors in place, so nothing crosses to the host.
        binding = sess.io_binding()
        dev_id = torch.device(self._device).index or 0
        for k, v in feeds.items():
            v = v.contiguous()
            binding.bind_input(k, "cuda", dev_id, _NP[str(v.dtype).removeprefix("torch.")], tuple(v.shape), v.data_ptr())
        outs = [torch.empty(s, device=self._device) for s in out_shapes]
        for o, t in zip(sess.get_outputs(), outs, strict=True):
            binding.bind_output(o.name, "cuda", dev_id, np.float32, tuple(t.shape), t.data_ptr())
        sess.run_with_iobinding(binding)
        return outs

    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        b = z.shape[0]
        self.check_batch(b)
        feeds = self.contract_feeds(self.sidecar["encoder"]["inputs"], (z.float(), tau.float(), label.long()))
        outs = self._run(self._enc, feeds, [(b, *s) for s in self.feature_shapes])
        return tuple(outs)

    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        b = z.shape[0]
        self.check_batch(b)
        feeds = self.contract_feeds(self.sidecar["denoiser"]["inputs"],
                                    (z.float(), t.float(), tau.float(), label.long(), *(f.float() for f in features)))
        return self._run(self._den, feeds, [(b, *self.sample_shape)])[0]
