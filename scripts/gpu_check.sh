#!/usr/bin/env bash
# One prepared check of the dk_ops CUDA kernels on a lent GPU machine (torch + nvcc there,
# no network). Builds the extension against that machine's torch, runs the CUDA tests
# (opcheck, float64 gradcheck, CUDA-vs-reference parity over the CPU test grid,
# float16/bfloat16 against float32), a compute-sanitizer memcheck of a small case, then
# benchmarks/bench_ops.py and the ERF engine's GPU case (benchmarks/bench_erf.py --cases b224).
# Everything lands in $OUT (8 files: summary.txt, build.log, pytest.log, memcheck.log, bench.log,
# bench_cuda.json, bench_cuda.md, bench_erf_cuda.json). Budget: < 8 min.
#
#   run: bash scripts/gpu_check.sh            (OUT defaults to ./gpu_check_out)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export DK_OPS_BUILD_DIR=${DK_OPS_BUILD_DIR:-/tmp/dk_ops_build}
export MAX_JOBS=${MAX_JOBS:-16}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
t0=$(date +%s)
stage() { say "[$(( $(date +%s) - t0 )) s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0), 'cap', torch.cuda.get_device_capability(0))" 2>&1
  command -v nvcc && nvcc --version | tail -2
  $PY -c "import ninja; print('ninja ok')" 2>&1
  git log --oneline -1 2>/dev/null
} >> "$SUMMARY" 2>&1
stage "env done"

# 1. Build (JIT, against this machine's torch; sm_90 from the device's capability).
stage "build start"
DK_OPS_VERBOSE_BUILD=1 timeout 300 $PY -m dk_ops._native > "$OUT/build.log" 2>&1
rc=$?
stage "build rc=$rc ($(grep -o "'cuda': [A-Za-z]*" "$OUT/build.log" | tail -1); $(grep -o "'cuda_reason': [^}]*" "$OUT/build.log" | tail -1 | cut -c1-300))"
if [ $rc -ne 0 ]; then
  grep -iE "error|fail" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
  exit 1
fi

# 2. Tests: CUDA parity/opcheck/gradcheck, then the CPU native suite on this torch.
stage "pytest start"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_native.py tests/test_native.py \
  --durations=10 > "$OUT/pytest.log" 2>&1
rc=$?
stage "pytest rc=$rc: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -10 | tee -a "$SUMMARY"

# 3. Memory checker on a small case (depthwise local + offsets + mask, general groups, global).
if command -v compute-sanitizer > /dev/null 2>&1; then
  stage "memcheck start"
  timeout 120 compute-sanitizer --tool memcheck --print-limit 20 $PY - > "$OUT/memcheck.log" 2>&1 <<'EOF'
import torch
from dk_ops import backend
assert backend.load_native()
from tests.test_native import make, call_native
for cfg in [dict(groups=4, gi=2, mask=True), dict(groups=2, gk=2, gi=1), dict(kernel="global", groups=1)]:
    args, sizes = make(dtype=torch.float32, **cfg)
    args = [None if a is None else a.cuda().requires_grad_() for a in args]
    y = call_native(args, sizes)
    y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("memcheck cases done")
EOF
  stage "memcheck rc=$?: $(grep -E 'ERROR SUMMARY|done' "$OUT/memcheck.log" | tr '\n' ' ')"
fi

# 4. Benchmarks (the issue's shapes), float32 with the reference path, then bfloat16 native only.
stage "bench start"
timeout 200 $PY benchmarks/bench_ops.py --device cuda --json "$OUT/bench_cuda.json" \
  --markdown "$OUT/bench_cuda.md" > "$OUT/bench.log" 2>&1
stage "bench rc=$?"
left=$(( 330 - ($(date +%s) - t0) ))
if [ $left -gt 60 ]; then
  timeout $(( left - 20 )) $PY benchmarks/bench_ops.py --device cuda --dtype bfloat16 --no-reference \
    --markdown /tmp/bench_cuda_bf16.md >> "$OUT/bench.log" 2>&1
  stage "bench bf16 rc=$?"
  { echo; echo "## bfloat16"; cat /tmp/bench_cuda_bf16.md; } >> "$OUT/bench_cuda.md" 2>/dev/null
fi
grep -E "^- |^\*\*" "$OUT/bench_cuda.md" 2>/dev/null | tee -a "$SUMMARY"

# 5. The ERF engine on the GPU (issue target: >= 10x over the RepLKNet loop at 224x224, 32 images).
stage "bench_erf start"
timeout 120 $PY benchmarks/bench_erf.py --device cuda --cases b224 --out "$OUT/bench_erf_cuda.json" >> "$OUT/bench.log" 2>&1
stage "bench_erf rc=$?: $(grep -E '^\| 224' "$OUT/bench.log" | tail -1)"
stage "done"
