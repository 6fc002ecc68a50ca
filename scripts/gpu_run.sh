#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command (docs/gpu.md):
#
#     OUT=/some/folder bash scripts/gpu_run.sh [--only bare,service,...]   (gpu_check.py's options)
#
# 1. unpacks the wheels from scripts/gpu_vendor.sh (artifacts/gpu_wheels) that match this Python into a temp folder,
#    for a bare GPU machine that has torch + CUDA, numpy, onnx and onnxruntime but none of the service's packages;
# 2. scripts/gpu_check.py: parity, encoder-stream overlap, CUDA graphs, images/s, whole images vs ONNX Runtime,
#    the service on CUDA, TensorRT where importable;
# 3. the tests marked gpu / tensorrt.
# Results land in $OUT (default artifacts/gpu_check): env.txt, gpu_check.{md,json,log}, service.log, pytest.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
{ nvidia-smi; $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    >"$OUT/env.txt" 2>&1
if [ -d artifacts/gpu_wheels ]; then
    VENDOR=$(mktemp -d)
    $PY - "$VENDOR" <<'PYEOF'
import sys, zipfile, pathlib
dest, (major, minor) = sys.argv[1], sys.version_info[:2]
def fits(tag: str, abi: str) -> bool:
    if tag in ("py3", "py2.py3"):
        return True
    v = int(tag[3:]) if tag.startswith("cp3") else 0
    return v == minor or (abi == "abi3" and v <= minor)
for whl in sorted(pathlib.Path("artifacts/gpu_wheels").glob("*.whl")):
    _name, _ver, tag, abi, _plat = whl.name[:-4].rsplit("-", 4)
    if fits(tag, abi):
        zipfile.ZipFile(whl).extractall(dest)
PYEOF
    export PYTHONPATH="$VENDOR:$PWD"
else
    export PYTHONPATH="$PWD"
fi
timeout "${GPU_CHECK_TIMEOUT:-480}" $PY scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" tests/engines 2>&1 | tee "$OUT/pytest.log"
