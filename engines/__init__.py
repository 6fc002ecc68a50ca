"""Runtime backends for the two networks behind one interface (onnxruntime, torch, tensorrt)."""

from engines.base import BackendUnavailable, Engine, EngineError, EngineInfo, FeatureHandle, Features, Precision
from engines.factory import Backend, EngineConfig, create_engine, resolve_backend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineInfo",
    "FeatureHandle",
    "Features",
    "Precision",
    "create_engine",
    "resolve_backend",
]
