"""The serving layer: FastAPI app, continuous-batching scheduler, settings, metrics."""
