#!/bin/sh
# First start on a GPU: build the TensorRT engines into the cache volume (they are specific to the GPU and the
# TensorRT version); later starts find them by key and skip the build. Without TensorRT the service falls back
# (backend auto: torch on CUDA).
set -e
if python -c "import tensorrt" 2>/dev/null; then
    python -m engines.build --checkpoint "${DUALRATE_CHECKPOINT:-checkpoints/mnist-dualrate}" \
        --max-batch "$((2 * ${DUALRATE_MAX_ACTIVE_IMAGES:-32}))"
fi
exec "$@"
