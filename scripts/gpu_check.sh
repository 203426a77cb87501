#!/usr/bin/env bash
# One prepared check of the dk_ops GPU backends on a lent GPU machine (torch + nvcc there, no
# network). Both GPU backends:
#   * Triton (the default for CUDA tensors; JIT-compiled by the triton that ships with torch, no
#     build): python -m dk_ops.triton.gpu_check -- the first-use self-check, parity and all
#     gradients against the float64 reference over the CPU test grid (float64, float32 with
#     NaN-poisoned buffers, float16/bfloat16), memory formats, batch 0, larger shapes, repeatable
#     weight gradients, opcheck, torch.compile (inductor, fullgraph), torch.export, and the
#     float16/bfloat16 error at the benchmark's depthwise shape;
#   * the CUDA C++ extension (opt-in, DK_OPS_BACKEND=cuda): built against this machine's torch,
#     then the CUDA tests (opcheck, float64 gradcheck, CUDA-vs-reference parity over the CPU test
#     grid, float16/bfloat16 against float32), the CPU native suite and the backend rules;
# then a compute-sanitizer memcheck of small cases of both, benchmarks/bench_ops.py (CUDA events,
# median of 20 runs after 5 warm-ups; Triton and CUDA C++ rows against cuDNN's depthwise conv2d,
# torchvision's deform_conv2d and the dense scope-kernel conv2d, with the GPU targets printed as
# met / NOT met), its float16 and bfloat16 rows, and the ERF engine's GPU case
# (benchmarks/bench_erf.py --cases b224) and erf-lab compare's (benchmarks/bench_compare.py).
# Everything lands in $OUT (summary.txt, triton_check.log, triton_check.json, build.log,
# pytest.log, memcheck.log, bench.log, bench_cuda.json, bench_cuda.md, bench_erf_cuda.json,
# bench_compare_cuda.json).
# Budget: about 10-12 min with a cold triton cache (the Triton stage JIT-compiles about 100 kernel
# specializations); TRITON_ONLY=1 skips the CUDA C++ build, tests and memcheck (about 6-7 min).
# Written and dry-run on a CPU only (its Triton section under the interpreter:
# TRITON_INTERPRET=1 python -m dk_ops.triton.gpu_check --device cpu --quick); not yet run on a GPU.
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
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/dk_ops_triton_cache}
export MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET DK_OPS_BACKEND
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
t0=$(date +%s)
stage() { say "[$(( $(date +%s) - t0 )) s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0), 'cap', torch.cuda.get_device_capability(0))" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc && nvcc --version | tail -2
  $PY -c "import ninja; print('ninja ok')" 2>&1
  git log --oneline -1 2>/dev/null
} >> "$SUMMARY" 2>&1
stage "env done"

# 1. Triton backend (no build): self-check, parity and gradients, formats, opcheck, compile, export.
stage "triton check start"
timeout 420 $PY -m dk_ops.triton.gpu_check --json "$OUT/triton_check.json" > "$OUT/triton_check.log" 2>&1
stage "triton check rc=$?: $(tail -1 "$OUT/triton_check.log")"
grep -E "^\[(ok|FAIL)\]" "$OUT/triton_check.log" | cut -c1-300 | tee -a "$SUMMARY"

if [ "${TRITON_ONLY:-0}" = "1" ]; then
  stage "TRITON_ONLY=1: CUDA C++ build, tests and memcheck skipped"
else
  # 2. CUDA C++ extension: JIT build against this machine's torch (sm_90 from the device's capability).
  stage "build start"
  DK_OPS_VERBOSE_BUILD=1 timeout 300 $PY -m dk_ops._native > "$OUT/build.log" 2>&1
  rc=$?
  stage "build rc=$rc ($(grep -o "'cuda': [A-Za-z]*" "$OUT/build.log" | tail -1); $(grep -o "'cuda_reason': [^}]*" "$OUT/build.log" | tail -1 | cut -c1-300))"
  if [ $rc -ne 0 ]; then
    grep -iE "error|fail" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
  fi

  # 3. Tests: CUDA C++ parity/opcheck/gradcheck, the CPU native suite and the backend rules on this torch.
  stage "pytest start"
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/dk_ops/test_cuda_native.py tests/dk_ops/test_native.py \
    tests/dk_ops/test_backend_selection.py --durations=10 > "$OUT/pytest.log" 2>&1
  rc=$?
  stage "pytest rc=$rc: $(tail -1 "$OUT/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -10 | tee -a "$SUMMARY"

  # 4. Memory checker on small cases of both backends (depthwise local + offsets + mask, general
  #    groups, global); the Triton kernels come from the triton cache step 1 filled.
  if command -v compute-sanitizer > /dev/null 2>&1; then
    stage "memcheck start"
    timeout 180 compute-sanitizer --tool memcheck --print-limit 20 $PY - > "$OUT/memcheck.log" 2>&1 <<'PYEOF'
import torch
from dk_ops import backend
from tests.dk_ops.test_native import make, call_native, flat
cases = [dict(groups=4, gi=2, mask=True), dict(groups=2, gk=2, gi=1), dict(kernel="global", groups=1)]
ops = [("triton", lambda a, s: torch.ops.dk_ops_triton.deform_kernel_conv2d(*a, *flat(s)))]
if backend.load_native() and backend._native.has_cuda():
    ops.append(("cuda", call_native))
for name, fn in ops:
    for cfg in cases:
        args, sizes = make(dtype=torch.float32, **cfg)
        args = [None if a is None else a.cuda().requires_grad_() for a in args]
        y = fn(args, sizes)
        y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    print("memcheck cases done:", name)
PYEOF
    stage "memcheck rc=$?: $(grep -E 'ERROR SUMMARY|done' "$OUT/memcheck.log" | tr '\n' ' ')"
  fi
fi

# 5. Benchmarks (the issue's shapes): float32 with the reference path (Triton rows, and CUDA C++
#    rows where that extension was built), then float16 and bfloat16 without it while time is left.
stage "bench start"
timeout 240 $PY benchmarks/bench_ops.py --device cuda --json "$OUT/bench_cuda.json" \
  --markdown "$OUT/bench_cuda.md" > "$OUT/bench.log" 2>&1
stage "bench rc=$?"
for dt in float16 bfloat16; do
  left=$(( 600 - ($(date +%s) - t0) ))
  if [ $left -gt 60 ]; then
    timeout $(( left - 20 )) $PY benchmarks/bench_ops.py --device cuda --dtype $dt --no-reference \
      --markdown /tmp/bench_cuda_$dt.md >> "$OUT/bench.log" 2>&1
    stage "bench $dt rc=$?"
    { echo; echo "## $dt"; cat /tmp/bench_cuda_$dt.md; } >> "$OUT/bench_cuda.md" 2>/dev/null
  fi
done
grep -E "^- |^\*\*|^## " "$OUT/bench_cuda.md" 2>/dev/null | tee -a "$SUMMARY"

# 6. The ERF engine on the GPU (issue target: >= 10x over the RepLKNet loop at 224x224, 32 images).
stage "bench_erf start"
timeout 120 $PY benchmarks/bench_erf.py --device cuda --cases b224 --out "$OUT/bench_erf_cuda.json" >> "$OUT/bench.log" 2>&1
stage "bench_erf rc=$?: $(grep -E '^\| 224' "$OUT/bench.log" | tail -1)"

# 7. erf-lab compare over layer1..layer4 against four compute_erf calls (issue target: >= 1.5x).
stage "bench_compare start"
timeout 120 $PY benchmarks/bench_compare.py --device cuda --out "$OUT/bench_compare_cuda.json" >> "$OUT/bench.log" 2>&1
stage "bench_compare rc=$?: $(grep -E '^\| ResNet-50-DW' "$OUT/bench.log" | tail -1)"
stage "done"
