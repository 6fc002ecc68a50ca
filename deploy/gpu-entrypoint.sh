#!/bin/sh
# First start on a GPU: build the TensorRT engines into the cache volume (they are specific to the GPU and the
# TensorRT version); later starts find them by key and skip the build. Without TensorRT, or when its build fails,
# the service starts on the next backend (torch on CUDA) with a log line saying why; it never exits here, so
# `restart: unless-stopped` cannot turn a failed build into a restart loop.
# Deliberately no `set -e`: a failed build is handled, not fatal.
log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) gpu-entrypoint: $*" >&2; }

if [ "${DUALRATE_BACKEND:-auto}" = "auto" ] || [ "${DUALRATE_BACKEND:-auto}" = "tensorrt" ]; then
    if python -c "import tensorrt" 2>/dev/null; then
        if python -m engines.build --checkpoint "${DUALRATE_CHECKPOINT:-checkpoints/mnist-dualrate}" \
                --max-batch "$((2 * ${DUALRATE_MAX_ACTIVE_IMAGES:-32}))"; then
            log "TensorRT engines ready"
        else
            log "TensorRT engine build failed (exit $?; see above): serving with DUALRATE_BACKEND=torch on CUDA instead"
            export DUALRATE_BACKEND=torch
        fi
    else
        log "TensorRT is not importable: serving with DUALRATE_BACKEND=torch on CUDA"
        export DUALRATE_BACKEND=torch
    fi
fi
exec "$@"
