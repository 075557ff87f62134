#!/usr/bin/env bash
# One short GPU check for the bd-ray kernels, total < ~5 minutes on one GPU:
#   1. the kernel tests on CUDA (compiled Triton kernels vs the torch reference), then
#   2. benchmarks/kernels_gpu.py (Triton sparse decode attention vs torch gather+SDPA, B in
#      {256, 1024, 2048}, batch 1 and 32, n_new 1 and 5, fp16, head_dim 64/128).
# Creates nothing heavy: uses an existing python with CUDA torch + triton (the repo's .venv is a
# CPU build and is not used), and pip-installs only what is missing. Output goes to stdout and, when
# $OUT is set (device runner), to $OUT/kernels_gpu.{txt,json}.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH="kernels:.${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
T0=$SECONDS

if ! "$PY" -c "import torch, triton" 2>/dev/null; then
    echo "[gpu_check] torch/triton not importable by $PY: installing torch==2.13.0 triton==3.7.1 (CUDA wheels)"
    "$PY" -m pip install -q "torch==2.13.0" "triton==3.7.1" || { echo "[gpu_check] pip install failed"; exit 3; }
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || echo "[gpu_check] WARNING: torch sees no CUDA device (CPU build?): the cuda tests will skip"
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest || { echo "[gpu_check] no pytest"; exit 3; }
"$PY" - <<'EOF'
import torch, triton
print(f"[gpu_check] torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda} "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
EOF

echo "[gpu_check] kernel tests on cuda"
BD_RAY_KERNEL_TEST_DEVICES=cuda timeout 240 "$PY" -m pytest tests/test_kernels.py -q -x -p no:cacheprovider \
    -o addopts="" -o timeout=0 -W ignore::pytest.PytestConfigWarning --durations=5
TEST_RC=$?
echo "[gpu_check] tests rc=$TEST_RC ($((SECONDS - T0)) s)"

echo "[gpu_check] benchmark"
JSON_ARG=()
[ -n "${OUT:-}" ] && JSON_ARG=(--json "$OUT/kernels_gpu.json")
timeout 240 "$PY" benchmarks/kernels_gpu.py "${JSON_ARG[@]}" "$@" | tee "${OUT:-/tmp}/kernels_gpu.txt"
BENCH_RC=${PIPESTATUS[0]}
echo "[gpu_check] benchmark rc=$BENCH_RC, total $((SECONDS - T0)) s"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
