#!/usr/bin/env bash
# Bundle the pure-Python and abi3/versioned wheels that the GPU run needs but a bare GPU machine may lack
# (it has torch with CUDA, numpy, onnx and a CPU onnxruntime, and no network): wheels for Python 3.11-3.13 in one
# folder; scripts/gpu_run.sh installs the matching ones offline. Torch, numpy and onnxruntime are left out.
#
#     bash scripts/gpu_vendor.sh            # -> artifacts/gpu_wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
OUT=artifacts/gpu_wheels
# Versions as in the dev venv, so the GPU run executes the code the tests checked.
PKGS=$($PIP freeze | grep -iE '^(safetensors|tqdm|pytest|pluggy|iniconfig|packaging|pytest-timeout|httpx|httpcore|h11|anyio|sniffio|idna|certifi|fastapi|starlette|uvicorn|pydantic|pydantic_core|pydantic-settings|python-dotenv|typing_extensions|typing-inspection|annotated-types|prometheus_client|pillow|click)==')
rm -rf "$OUT"
for v in 3.11 3.12 3.13; do
    # shellcheck disable=SC2086
    $PIP download --quiet --only-binary=:all: --python-version "$v" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --dest "$OUT" $PKGS 2>/dev/null || echo "warning: no complete wheel set for Python $v" >&2
done
du -sh "$OUT"
