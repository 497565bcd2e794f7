#!/usr/bin/env bash
# One-shot verification of nat_mm's CUDA kernels on a lent GPU machine (H100/H200, Python
# 3.12, torch 2.11 + CUDA 13, 16 cores, no internet). Run from anywhere:
#
#   bash tools/gpu_check.sh            # report under $OUT (when set) or /tmp/nat_mm_gpu_check
#
# Steps, each with its own time limit, all within GPU_CHECK_BUDGET_S (default 450 s):
#   1. build the extension in place with the CUDA kernels (ninja, 16 jobs, sm_90)
#   2. tests/test_cuda_ops.py (every op vs the float64 reference, all dtypes, both kernel
#      paths, bad inputs, determinism, streams; NAT_MM_RUN_SLOW=1 adds the >2^31-element test)
#      and tests/test_autocast.py, tests/test_transforms.py (torch.autocast, torch.func)
#      (a test that crashed its worker is rerun under gdb or cuda-gdb for a backtrace, and
#      in a copy of the tree built with /usr/bin/g++ when the build used another compiler)
#   3. a small case of every op under compute-sanitizer memcheck (if installed)
#   4. tools/benchmark_gpu.py with the time that is left
# GPU_CHECK_REUSE_BUILD=1 skips step 1 when nat_mm/_C*.so exists (a rerun on a warm machine).
# Writes (at most 8 files, as the device tool returns): gpu_check_report.txt,
# gpu_check.json, gpu_check_log.txt, cuda_tests.xml, sanitizer.txt, benchmark.json,
# benchmark.txt. Exit status 0 only if the build and every test passed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REPORT_DIR="${OUT:-/tmp/nat_mm_gpu_check}"
mkdir -p "$REPORT_DIR"
LOG="$REPORT_DIR/gpu_check_log.txt"
: >"$LOG"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
# the in-place build is imported from here by every step (the sanitizer's script too)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
declare -A STATUS SECONDS_TAKEN

log() { echo "[gpu_check $(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
# step NAME CAP RESERVE COMMAND...: run with timeout min(CAP, time left - RESERVE). The
# reserves keep the later steps' minimum (tests ~50 s, sanitizer ~15 s, some benchmark):
# on 2026-11-28 a 230 s budget with larger reserves left the tests 28 s.
step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  local limit
  limit=$(( $(left) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    log "SKIP $name: no time left"
    STATUS[$name]=skipped
    SECONDS_TAKEN[$name]=0
    return 0
  fi
  log "START $name (limit ${limit}s)"
  local t=$(date +%s) rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$(($(date +%s) - t))
  if [ "$rc" -eq 0 ]; then STATUS[$name]=passed
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS[$name]=timeout
  else STATUS[$name]="failed (exit $rc)"; fi
  log "END $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
  return 0
}

# ---------------------------------------------------------------- 0. environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  command -v nvcc && nvcc --version | tail -1
  "$PY" -m pytest --version 2>&1 | head -1
  # the compiler the build will use and the libstdc++ it was made for (vs the one mapped
  # at run time, printed after the build: a newer compiler than that runtime is suspect)
  CXX_USED="${CXX:-c++}"
  echo "C++ compiler: $("$CXX_USED" --version 2>&1 | head -1) (CXX=${CXX:-unset});" \
    "its libstdc++: $(readlink -f "$("$CXX_USED" -print-file-name=libstdc++.so.6)")"
} 2>&1 | tee -a "$LOG"
if ! "$PY" -m pytest --version >/dev/null 2>&1; then
  log "pytest is missing: carry it as a wheel (see /work/.library/device/README.md)"
fi

# ---------------------------------------------------------------- 1. build
export MAX_JOBS="${MAX_JOBS:-16}" NAT_MM_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ "${GPU_CHECK_REUSE_BUILD:-0}" = 1 ] && ls nat_mm/_C*.so >/dev/null 2>&1; then
  log "reusing the existing in-place build (GPU_CHECK_REUSE_BUILD=1)"
  STATUS[build]=passed; SECONDS_TAKEN[build]=0
else
  rm -f nat_mm/_C*.so
  step build 240 120 "$PY" setup.py build_ext --inplace
fi
if [ "${STATUS[build]}" = passed ]; then
  # the libstdc++ copies in the process: a diagnostic for the check-message crash (docs/gpu.md)
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import re
import nat_mm.ops as o
print("backend:", o.backend_info())
for path in sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l}):
    versions = re.findall(rb"GLIBCXX_3\.4\.(\d+)", open(path, "rb").read())
    print("libstdc++ mapped:", path, "newest GLIBCXX_3.4.%d" % max(map(int, versions)))
EOF
fi

# ---------------------------------------------------------------- 2. tests
XDIST=()
if "$PY" -c 'import xdist' >/dev/null 2>&1; then XDIST=(-n 8); fi
# 8 workers x 2 OpenMP threads = the 16 cores: more threads per worker oversubscribe them,
# and OpenMP's spin-waiting then makes every CPU reference 10-30x slower.
if [ "${STATUS[build]}" = passed ]; then
  OMP_NUM_THREADS=2 NAT_MM_RUN_SLOW=1 step tests 210 70 "$PY" -m pytest tests/test_cuda_ops.py \
    tests/test_autocast.py tests/test_transforms.py -q -rfEs \
    "${XDIST[@]}" -p no:cacheprovider --junitxml="$REPORT_DIR/cuda_tests.xml"
else
  STATUS[tests]="not run (build failed)"; SECONDS_TAKEN[tests]=0
fi

# A pytest worker that dies (a host segfault) leaves only "crashed while running <test>":
# rerun the first such test alone under gdb (the device image has only cuda-gdb, which
# debugs host code too) for a native backtrace; the interpreter itself, not a wrapper.
CRASHED="$(grep -o "crashed while running '[^']*'" "$LOG" | head -1 | cut -d"'" -f2)"
DEBUGGER="$(command -v gdb || command -v cuda-gdb || ls /usr/local/cuda/bin/cuda-gdb 2>/dev/null \
  || true)"
if [ -n "$CRASHED" ] && [ -n "$DEBUGGER" ]; then
  step crash_backtrace 60 100 "$DEBUGGER" -q -batch -ex run -ex 'bt 40' -ex 'info sharedlibrary' \
    --args "$("$PY" -c 'import sys; print(sys.executable)')" -m pytest -q -p no:cacheprovider \
    "$CRASHED"
elif [ -n "$CRASHED" ]; then
  log "a test crashed ($CRASHED); neither gdb nor cuda-gdb is installed, so no native backtrace"
fi

# Is the image's compiler the cause? The image builds with its own GCC (/opt/gcc, through
# CXX/CC; docs/gpu.md): build a copy of the tree with the system compiler and rerun the
# crashed test there. The main build stays as it was for the later steps.
SYS_CXX=/usr/bin/g++
if [ -n "$CRASHED" ] && [ -x "$SYS_CXX" ] && [ -x /usr/bin/gcc ] && \
    [ "$(readlink -f "$(command -v "${CXX:-c++}")")" != "$(readlink -f "$SYS_CXX")" ]; then
  ALT=/tmp/nat_mm_system_cxx
  rm -rf "$ALT" && mkdir -p "$ALT"
  cp -r setup.py pyproject.toml pytest.ini csrc nat_mm tests "$ALT"/
  rm -f "$ALT"/nat_mm/_C*.so
  "$SYS_CXX" --version | head -1 | tee -a "$LOG"
  step system_cxx_build 150 110 env -C "$ALT" CXX="$SYS_CXX" CC=/usr/bin/gcc \
    "$PY" setup.py build_ext --inplace
  if [ "${STATUS[system_cxx_build]}" = passed ]; then
    step system_cxx_crashed_test 60 90 env -C "$ALT" PYTHONPATH="$ALT" "$PY" -m pytest -q \
      -p no:cacheprovider "$CRASHED"
  fi
fi

# ---------------------------------------------------------------- 3. compute-sanitizer
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
SAN_SCRIPT="$(mktemp /tmp/nat_mm_sanitizer.XXXXXX.py)"
cat >"$SAN_SCRIPT" <<'EOF'
import os
import torch
from nat_mm.ops import na2d, na2d_qk, na2d_av
from nat_mm.ops.library import op

for path in ('default', 'tensor-cores', 'simple'):
    os.environ['NAT_MM_CUDA_FORCE_SIMPLE'] = '1' if path == 'simple' else '0'
    os.environ['NAT_MM_CUDA_TENSOR_CORES'] = '1' if path == 'tensor-cores' else '0'
    for dtype in (torch.float32, torch.bfloat16):
        for (b, h, H, W, D, ks, dil) in [(1, 2, 13, 15, 33, (5, 3), (2, 3)),
                                         (1, 2, 19, 22, 32, (7, 5), (1, 2)),
                                         (1, 1, 16, 17, 100, (7, 7), (1, 1)),
                                         (1, 1, 9, 9, 8, (9, 9), (1, 1))]:
            q, k, v = (torch.randn(b, h, H, W, D, device='cuda', dtype=dtype,
                                   requires_grad=True) for _ in range(3))
            rpb = torch.randn(h, 2 * ks[0] - 1, 2 * ks[1] - 1, device='cuda', dtype=dtype,
                              requires_grad=True)
            out = na2d(q, k, v, ks, dil, rpb=rpb)
            torch.autograd.grad(out.float().square().sum(), (q, k, v, rpb))
            attn = na2d_qk(q, k, ks, dil, rpb=rpb)
            y = na2d_av(attn.softmax(-1), v, ks, dil)
            torch.autograd.grad(y.float().sum(), (q, k, v, rpb))
            op('na2d_rpb_grad')(attn.detach(), list(ks), list(dil))
torch.cuda.synchronize()
print('sanitizer case done')
EOF
if [ "${STATUS[build]}" = passed ] && [ -n "$SAN" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step sanitizer 90 50 \
    "$SAN" --tool memcheck --error-exitcode 3 --print-limit 20 "$PY" "$SAN_SCRIPT"
  grep -E "ERROR SUMMARY|sanitizer case done|Invalid|out of bounds" "$LOG" | tail -20 \
    >"$REPORT_DIR/sanitizer.txt" || true
elif [ -z "$SAN" ]; then
  STATUS[sanitizer]="not run (compute-sanitizer not found)"; SECONDS_TAKEN[sanitizer]=0
else
  STATUS[sanitizer]="not run (build failed)"; SECONDS_TAKEN[sanitizer]=0
fi
rm -f "$SAN_SCRIPT"

# ---------------------------------------------------------------- 4. benchmark
if [ "${STATUS[build]}" = passed ]; then
  BENCH_BUDGET=$(( $(left) - 40 ))
  step benchmark 400 10 "$PY" tools/benchmark_gpu.py --budget-s "$BENCH_BUDGET" --quick --profile \
    --json "$REPORT_DIR/benchmark.json"
  grep -A200 -E "^benchmark_gpu: " "$LOG" | grep -vE "^\[gpu_check" >"$REPORT_DIR/benchmark.txt" || true
else
  STATUS[benchmark]="not run (build failed)"; SECONDS_TAKEN[benchmark]=0
fi

# ---------------------------------------------------------------- report
TOTAL=$(($(date +%s) - T0))
STEPS_JSON="{"
for s in build tests crash_backtrace system_cxx_build system_cxx_crashed_test sanitizer \
    benchmark; do
  case "$s" in crash_backtrace|system_cxx_*) [ -n "${STATUS[$s]:-}" ] || continue ;; esac
  STEPS_JSON+="\"$s\": {\"status\": \"${STATUS[$s]:-not run}\", \"seconds\": ${SECONDS_TAKEN[$s]:-0}},"
done
STEPS_JSON="${STEPS_JSON%,}}"
"$PY" - "$REPORT_DIR" "$TOTAL" "$STEPS_JSON" <<'EOF' | tee -a "$LOG"
import json, os, sys
import xml.etree.ElementTree as ET
report_dir, total, steps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
info = {'total_seconds': total, 'steps': steps}
try:
    import torch
    info['torch'] = torch.__version__
    info['gpu'] = torch.cuda.get_device_name(0)
except Exception as e:  # noqa
    info['gpu'] = f'unknown ({e})'
xml = os.path.join(report_dir, 'cuda_tests.xml')
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == 'testsuite' else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
    info['tests'] = tot
    failed = []
    for s in suites:
        for case in s.iter('testcase'):
            if case.find('failure') is not None or case.find('error') is not None:
                failed.append(case.get('classname', '') + '::' + case.get('name', ''))
    info['failed_tests'] = failed[:50]
bench = os.path.join(report_dir, 'benchmark.json')
if os.path.exists(bench):
    b = json.load(open(bench))
    info['benchmark_ratios'] = b.get('ratios', [])
    info['benchmark_stopped_early'] = b.get('stopped_early')
executed = info.get('tests', {}).get('tests', 0) - info.get('tests', {}).get('skipped', 0)
info['tests_executed'] = executed
# OK needs a GPU, a passing build and passing tests that actually ran (not all skipped)
info['ok'] = (steps['build']['status'] == 'passed' and steps['tests']['status'] == 'passed'
              and executed > 0 and not str(info.get('gpu', '')).startswith('unknown'))
json.dump(info, open(os.path.join(report_dir, 'gpu_check.json'), 'w'), indent=1)
lines = [f"nat_mm gpu_check on {info.get('gpu')} (torch {info.get('torch')}): "
         f"{'OK' if info['ok'] else 'NOT OK'} in {total} s"]
for name, s in steps.items():
    lines.append(f"  {name:23s} {s['status']} ({s['seconds']} s)")
if 'tests' in info:
    t = info['tests']
    lines.append(f"  tests: {t['tests']} collected, {executed} executed, {t['failures']} failures, "
                 f"{t['errors']} errors, {t['skipped']} skipped")
    lines += [f'    FAILED {n}' for n in info['failed_tests']]
for r in info.get('benchmark_ratios', []):
    cols = ' '.join(f"{k.split('/')[1]}={v:.2f}" for k, v in r.items() if '/' in k)
    lines.append(f"  ratio {r['task']} s{r['stage']} {r['dtype']} {r['mode']}: {cols}")
text = '\n'.join(lines)
open(os.path.join(report_dir, 'gpu_check_report.txt'), 'w').write(text + '\n')
print(text)
sys.exit(0 if info['ok'] else 1)
EOF
exit $?
