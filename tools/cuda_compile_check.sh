#!/usr/bin/env bash
# Compile every CUDA source (csrc/cuda/*.cu) with `nvcc -c` for sm_80 and sm_90, with the
# flags setup.py's CUDAExtension uses, against the headers of a CUDA build of torch. No GPU
# is needed. Exits non-zero, naming the file, if any source fails.
#
# The CPU torch wheel lacks c10/cuda's build headers, so the headers come from a CUDA torch
# in its own virtual environment, created on first use and reused afterwards:
#   NAT_MM_CUDA_VENV   venv location            (default /tmp/nat_mm_cuda_venv)
#   NAT_MM_CUDA_TORCH  torch requirement in it  (default torch==2.14.1: CUDA 13.0, matches
#                      the nvcc here; brings nvidia/cu13/include; ~5.5 GB, ~1 min locally)
#   NVCC               compiler                 (default: nvcc on PATH)
#   JOBS               parallel compiles        (default 2)
#   NAT_MM_CUDA_ARCHS  space-separated SM list  (default "80 90")
#   OUT_DIR            object files and logs    (default: a fresh /tmp/nat_mm_cuda_objs.XXXX,
#                      removed at the end when every source compiled, kept to read otherwise)
#   NAT_MM_CUDA_SOURCES  space-separated .cu files to compile instead of csrc/cuda/*.cu
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NAT_MM_CUDA_VENV:-/tmp/nat_mm_cuda_venv}"
TORCH_REQ="${NAT_MM_CUDA_TORCH:-torch==2.14.1}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
JOBS="${JOBS:-2}"
ARCHS="${NAT_MM_CUDA_ARCHS:-80 90}"

if [ -z "$NVCC" ]; then
  echo "cuda_compile_check: nvcc not found on PATH" >&2
  exit 2
fi

# ---------------------------------------------------------------- the CUDA torch venv
venv_ok() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
      >/dev/null 2>&1
}
if ! venv_ok; then
  echo "cuda_compile_check: creating $VENV with $TORCH_REQ (one-time, a few minutes)"
  t0=$(date +%s)
  # A lock so that concurrent runs (CI shards, pytest-xdist) create it once.
  mkdir -p "$(dirname "$VENV")"
  exec 9>"$VENV.lock"
  flock 9
  if ! venv_ok; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" || { echo "cuda_compile_check: venv creation failed" >&2; exit 2; }
    "$VENV/bin/pip" install -q "$TORCH_REQ" ||
      { echo "cuda_compile_check: pip install $TORCH_REQ failed" >&2; exit 2; }
  fi
  flock -u 9
  echo "cuda_compile_check: venv ready in $(( $(date +%s) - t0 )) s"
fi

# ---------------------------------------------------------------- flags from torch itself
FLAGS_FILE="$(mktemp /tmp/nat_mm_nvcc_flags.XXXXXX)"
"$VENV/bin/python" - "$ROOT" >"$FLAGS_FILE" 2>/dev/null <<'EOF' || { echo "cuda_compile_check: cannot query torch for flags" >&2; exit 2; }
import os, sys, sysconfig
import torch
from torch.utils import cpp_extension as ce
root = sys.argv[1]
inc = [p for p in ce.include_paths() if os.path.isdir(p)]
site = sysconfig.get_paths()['purelib']
for sub in ('nvidia/cu13/include', 'nvidia/cuda_runtime/include'):
    p = os.path.join(site, sub)
    if os.path.isdir(p):
        inc.append(p)
sys.path.insert(0, root)
from setup import NVCC_OPTIMIZATION, cxx_standard  # the flags setup.py builds with
std = cxx_standard(torch.__version__)
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
flags = ['-I' + os.path.join(root, 'csrc')] + ['-I' + p for p in inc]
flags += list(ce.COMMON_NVCC_FLAGS)
flags += NVCC_OPTIMIZATION + [std, '-DNAT_MM_WITH_CUDA',
          '-DTORCH_EXTENSION_NAME=_C', '-DTORCH_API_INCLUDE_EXTENSION_H',
          f'-D_GLIBCXX_USE_CXX11_ABI={abi}', '-Xcompiler', '-fPIC']
print('\n'.join(flags))
EOF
mapfile -t FLAGS <"$FLAGS_FILE"
rm -f "$FLAGS_FILE"
GENCODE=()
for a in $ARCHS; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done

shopt -s nullglob
if [ -n "${NAT_MM_CUDA_SOURCES:-}" ]; then
  read -r -a SOURCES <<<"$NAT_MM_CUDA_SOURCES"
else
  SOURCES=("$ROOT"/csrc/cuda/*.cu)
fi
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "cuda_compile_check: no csrc/cuda/*.cu sources" >&2
  exit 1
fi
OWN_OUT_DIR=0
if [ -z "${OUT_DIR:-}" ]; then
  OUT_DIR="$(mktemp -d /tmp/nat_mm_cuda_objs.XXXXXX)"
  OWN_OUT_DIR=1
fi
mkdir -p "$OUT_DIR"
echo "cuda_compile_check: $("$NVCC" --version | tail -1); torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'); archs: $ARCHS; $JOBS jobs; objects in $OUT_DIR"

compile_one() {
  local src="$1" name log t0 rc
  name="$(basename "$src" .cu)"
  log="$OUT_DIR/$name.log"
  t0=$(date +%s)
  "$NVCC" -c "$src" -o "$OUT_DIR/$name.o" "${GENCODE[@]}" "${FLAGS[@]}" >"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "OK    $name.cu ($(( $(date +%s) - t0 )) s)"
  else
    echo "FAIL  $name.cu (exit $rc, $(( $(date +%s) - t0 )) s):"
    sed 's/^/      /' "$log" | head -60
  fi
  return $rc
}

T0=$(date +%s)
failed=()
pids=()
names=()
for src in "${SOURCES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.5; done
  compile_one "$src" &
  pids+=($!)
  names+=("$(basename "$src")")
done
for k in "${!pids[@]}"; do
  wait "${pids[$k]}" || failed+=("${names[$k]}")
done
echo "cuda_compile_check: ${#SOURCES[@]} sources in $(( $(date +%s) - T0 )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "cuda_compile_check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "cuda_compile_check: all CUDA sources compiled"
# Its own temporary objects (17 MB a run) would otherwise pile up in /tmp run after run.
if [ "$OWN_OUT_DIR" = 1 ]; then rm -rf "$OUT_DIR"; fi
