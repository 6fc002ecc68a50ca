#!/usr/bin/env bash
# Bundle the wheels that the GPU run needs but a bare GPU machine lacks (it has torch with CUDA, numpy, onnx and a
# CPU onnxruntime, and no network): the runtime dependencies of this project (pyproject.toml, read here, so the list
# cannot drift from it) with everything they pull in, plus pytest for the GPU tests, for Python 3.11-3.13, in one
# folder; scripts/gpu_run.sh unpacks the matching ones offline. Left out: what the GPU machine has (torch, numpy,
# onnx, onnxruntime and their own dependencies) and the research tools' matplotlib and scipy (nothing on the serving
# path imports them).
#
#     bash scripts/gpu_vendor.sh            # -> artifacts/gpu_wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PIP=${PIP:-.venv/bin/pip}
OUT=artifacts/gpu_wheels
# Versions as in the dev venv, so the GPU run executes the code the tests checked.
PKGS=$($PY scripts/runtime_wheels.py)
rm -rf "$OUT"
for v in 3.11 3.12 3.13; do
    # shellcheck disable=SC2086
    $PIP download --quiet --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --dest "$OUT" $PKGS 2>/dev/null || echo "warning: no complete wheel set for Python $v" >&2
done
du -sh "$OUT"
