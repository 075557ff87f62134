#!/usr/bin/env bash
# The prepared device check (benchmarks/gpu_check.py: five parts, JSON to $OUT/gpu_check.json), as
# one call on a machine with no network: nothing is downloaded. Wheels carried in the repository's
# .whl/ folder (pydantic & co., results/gpu/README.md says which and how) are installed first into
# /tmp/bd_ray_site with pip --no-index --no-deps; then versions are printed and the parts run,
# each with a timeout, all within --deadline-s (450 s by default; this wrapper stops at 500 s).
#   bash benchmarks/gpu_check.sh                 # on the GPU machine ($OUT set by the runner)
#   bash benchmarks/gpu_check.sh --cpu-smoke     # anywhere: tiny shapes on the CPU
# Extra arguments go to gpu_check.py (--parts, --contexts, --batches, --alphas, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/bd_ray_site
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl \
            && echo "[gpu_check] installed $(ls .whl/*.whl | wc -l) carried wheels into $SITE" \
            || echo "[gpu_check] WARNING: installing the carried wheels failed (the parts needing them will say so)"
    else  # no pip: a wheel is a zip laid out for site-packages
        for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || echo "[gpu_check] WARNING: could not unpack $w"; done
        echo "[gpu_check] no pip: unpacked $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sys, torch; print(f'[gpu_check] {sys.executable} python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}')" \
    || echo "[gpu_check] WARNING: $PY cannot import torch"
timeout 500 "$PY" benchmarks/gpu_check.py "$@"
