"""Runtime backends for the two networks behind one interface (onnxruntime, torch, tensorrt)."""

from engines.base import BackendUnavailable, Engine, EngineError, EngineInfo, FeatureHandle, Features
from engines.factory import Backend, create_engine, resolve_backend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Engine",
    "EngineError",
    "EngineInfo",
    "FeatureHandle",
    "Features",
    "create_engine",
    "resolve_backend",
]
