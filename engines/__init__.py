"""Runtime backends for the two networks behind one interface (onnxruntime, torch, tensorrt)."""

from engines.base import BackendUnavailable, Engine, EngineError, EngineInfo, FeatureHandle, Features, Precision
from engines.factory import REGISTRY, Backend, BackendSpec, EngineConfig, Resolved, create_engine, resolve, resolve_backend

__all__ = [
    "REGISTRY",
    "Backend",
    "BackendSpec",
    "BackendUnavailable",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineInfo",
    "FeatureHandle",
    "Features",
    "Precision",
    "Resolved",
    "create_engine",
    "resolve",
    "resolve_backend",
]
