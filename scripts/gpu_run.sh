#!/usr/bin/env bash
# Every GPU check in one command (docs/gpu.md), at most ~8 minutes on one H100/H200:
#
#     OUT=/some/folder bash scripts/gpu_run.sh [--only quality,bare-rgb64,...]     (gpu_check.py's options)
#     OUT=/tmp/dry bash scripts/gpu_run.sh --dry-run      # the same code paths on the CPU, tiny preset, < 2 min
#
# 1. unpacks the wheels from scripts/gpu_vendor.sh (artifacts/gpu_wheels) that match this Python into a temp folder,
#    for a bare GPU machine that has torch + CUDA, numpy, onnx and onnxruntime but none of the service's packages;
# 2. scripts/gpu_check.py: compiled bf16 quality, the bare loop and the service at rgb64 and MNIST size (256 slots),
#    a foreign torch.export pair compiled against its ONNX twin;
# 3. the tests marked gpu / tensorrt (not in a dry run).
# Results land in $OUT (default artifacts/gpu_check): env.txt, gpu_check.{md,json,log}, service-*.log, pytest.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu_check}
PY=${PY:-python3}
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
mkdir -p "$OUT"
{ [ "$DRY" = 1 ] || nvidia-smi; $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    >"$OUT/env.txt" 2>&1
if [ -d artifacts/gpu_wheels ] && [ "$DRY" = 0 ]; then
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
    export PATH="$VENDOR/bin:$PATH"
else
    export PYTHONPATH="$PWD"
fi
# The inductor cache of this run (compiled kernels are reused between the bare loops and the services).
export DUALRATE_ONNX_CACHE="${DUALRATE_ONNX_CACHE:-$OUT/cache}"
timeout "${GPU_CHECK_TIMEOUT:-480}" $PY scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$DRY" = 0 ]; then
    timeout 120 $PY -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" tests/engines tests/service/test_fused.py 2>&1 | tee "$OUT/pytest.log"
fi
exit "$rc"
