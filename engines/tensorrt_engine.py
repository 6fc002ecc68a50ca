"""TensorRT backend: two engines built from the ONNX graphs, each with its own execution context.

The encoder is enqueued on a dedicated CUDA stream, the denoiser on the caller's stream, ordered by CUDA events.
Written against the TensorRT 10/11 name-based Python API (see shared TENSORRT_NOTES); TensorRT cannot be installed
on the development machines, so this path is exercised only by tests marked `tensorrt` on a GPU machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from engines.base import Backend, BackendUnavailable, Engine, EngineError, EngineInfo, Features, Precision
from export.card import ModelCard

log = logging.getLogger("engines.tensorrt")


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable("TensorRT is not installed: use the GPU image or `pip install tensorrt`") from e
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs an NVIDIA GPU, and torch sees none")
    return trt


def torch_dtype(trt, dt) -> torch.dtype:
    """Explicit map: trt.nptype covers neither BF16 nor FP8."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise EngineError(f"unsupported TensorRT tensor type {dt}")
    return table[dt]


class _TrtNetwork:
    """One deserialized engine + its execution context; runs by tensor name on a given stream."""

    def __init__(self, trt, runtime, path: Path) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {path}: rebuild it with `python -m engines.build`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, feeds: dict[str, Tensor], stream: int) -> list[Tensor]:
        keep = []
        for name in self.inputs:
            x = feeds[name].to(self.dtypes[name]).contiguous()
            keep.append(x)
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise EngineError(f"TensorRT rejected shape {tuple(x.shape)} for input {name}")
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            y = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        if not self.context.execute_async_v3(stream):
            raise EngineError("TensorRT execute_async_v3 failed")
        self._keep = keep  # inputs must stay alive until the stream has consumed them
        return outs


class TensorRTEngine(Engine):
    PRECISIONS = frozenset({Precision.FP16})  # the engines are built from the FP16 graphs, strongly typed

    def __init__(self, engine_dir: Path, sidecar: dict, spec: ModelCard, max_batch: int = 64) -> None:
        """`sidecar`: the export's onnx.json (shapes); `spec`: the model card (tensor names, time input)."""
        super().__init__()
        trt = _import_trt()
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._trt_logger)
        self._enc = _TrtNetwork(trt, runtime, Path(engine_dir) / "encoder.engine")
        self._den = _TrtNetwork(trt, runtime, Path(engine_dir) / "denoiser.engine")
        self.sidecar, self.spec = sidecar, spec
        self.feature_shapes = [tuple(o["shape"]) for o in sidecar["encoder"]["outputs"]]
        self.sample_shape = tuple(sidecar["denoiser"]["outputs"][0]["shape"])
        self.max_batch = max_batch
        self._encoder_stream = torch.cuda.Stream()
        self._precision = "fp16" if self._den.dtypes["z"] == torch.float16 else "fp32"

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(Backend.TENSORRT, "cuda:0", Precision(self._precision), (), self.max_batch)

    @property
    def device(self) -> str:
        return "cuda:0"

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def encode(self, z: Tensor, tau: Tensor, label: Tensor) -> Features:
        """On the current stream (the encoder stream inside `encode_async`)."""
        self.check_batch(z.shape[0])
        feeds = self.encoder_feeds(z.cuda(), tau.cuda(), label.cuda())
        return tuple(o.float() for o in self._enc(feeds, torch.cuda.current_stream().cuda_stream))

    def denoise(self, z: Tensor, t: Tensor, tau: Tensor, label: Tensor, features: Features) -> Tensor:
        self.check_batch(z.shape[0])
        feeds = self.denoiser_feeds(z.cuda(), t.cuda(), tau.cuda(), label.cuda(), features)
        return self._den(feeds, torch.cuda.current_stream().cuda_stream)[0].float()
