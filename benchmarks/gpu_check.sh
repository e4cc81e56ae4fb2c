#!/usr/bin/env bash
# The GPU check of issue 14, a few minutes on one CUDA GPU: the cuda-marked tests, then benchmarks/gpu_check.py
# (parity with transformers for every family's tiny model, speed on random Gemma 3 270M-shaped weights).
#   benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py flags, e.g. --device cpu --dtype float32 --quick]
# Needs torch (a CUDA build), transformers, tokenizers and pytest importable by $PYTHON (default python3).
# Writes OUT_DIR/cuda_tests.txt, gpu_check.json, gpu_check.md; exits non-zero if the tests or the script failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
shift || true
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, transformers, tokenizers, pytest" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch, transformers, tokenizers and pytest" >&2
  exit 2
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
"$PY" -m pytest -q -ra -m cuda tests/test_devices.py 2>&1 | tee "$OUT/cuda_tests.txt"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
bench=$?
echo "gpu_check: cuda tests exit $tests, benchmarks exit $bench; results in $OUT"
[ "$tests" -eq 0 ] || [ "$tests" -eq 5 ] && [ "$bench" -eq 0 ]
