#!/usr/bin/env bash
# The whole device call (benchmarks/GPU.md): install the carried wheels, run `make gpu-check`, and
# pack its folder into $OUT (the device returns at most 8 files), so one call does everything:
#   run(command="bash benchmarks/gpu_device_run.sh", carry=[".whl", ".data"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-result}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_device_run: wheel install failed" >&2; exit 3; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
RESULT=/tmp/gpu-check-out
make gpu-check GPU_PY=python3 GPU_CHECK_OUT=$RESULT
rc=$?
cp "$RESULT/summary.md" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu-check.tar.gz" -C "$(dirname $RESULT)" "$(basename $RESULT)" --exclude='*/runs/*/cache*'
cat "$RESULT/summary.md"
exit $rc
