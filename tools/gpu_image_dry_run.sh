#!/usr/bin/env bash
# A dry run of tools/gpu_check.sh without a GPU, in the lent GPU machine's versions (Python
# 3.12, torch 2.11 + CUDA 13; no mm packages there): catches what would fail on a lent
# machine for reasons of version, not of hardware, before device time is spent on it.
# (2026-12-07: torch.compile(fullgraph=True) of na2d failed under torch 2.11's dynamo, while
# CI, on torch 2.13, passed.)
#
#   bash tools/gpu_image_dry_run.sh    # the first time on 2 cores: ~7 min of build, a
#                                      # download of ~3 GB (torch 2.11's CUDA build)
# Steps:
#   1. a venv (DRY_RUN_VENV, default /tmp/nat_mm_gpu_image) with Python 3.12 (PYTHON312),
#      torch 2.11.0 from PyPI, pytest, mmengine (pure Python: the backbone tests then run)
#   2. a copy of this tree (tracked and untracked files) built there with the CUDA kernels
#      for sm_90, as gpu_check.sh builds it (nvcc must be installed; no GPU needed)
#   3. gpu_check.sh on that build (its CUDA tests skip without a GPU; the autocast and
#      transforms tests run on CPU), then the whole test suite (the mmdet/mmseg ones skip)
# Exit status 0 only when both passed. Logs under DRY_RUN_OUT (default /tmp/nat_mm_dry_run).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DRY_RUN_VENV:-/tmp/nat_mm_gpu_image}"
OUT_DIR="${DRY_RUN_OUT:-/tmp/nat_mm_dry_run}"
PY312="${PYTHON312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python)}"
TREE="$OUT_DIR/tree"
say() { printf '==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "venv $VENV: $("$PY312" --version) + torch 2.11.0 (CUDA 13 build, from PyPI)"
  "$PY312" -m venv "$VENV" || exit 1
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check -q torch==2.11.0 pytest \
  hypothesis numpy ninja "setuptools<81" wheel "mmengine==0.10.7" || exit 1

say "a copy of the tree in $TREE"
# (its build/ is kept: ninja recompiles only the sources changed since the last dry run)
mkdir -p "$TREE" && find "$TREE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git -C "$ROOT" ls-files -co --exclude-standard | tar -C "$ROOT" -cf - -T - | tar -C "$TREE" -xf -

say "build with the CUDA kernels (sm_90)"
# this machine's toolkit keeps libcudart.so in lib/, not in lib64/ where torch's build looks
CUDA_LIB="$(dirname "$(ls "${CUDA_HOME:-/usr/local/cuda}"/lib*/libcudart.so 2>/dev/null \
  | head -1)")"
(cd "$TREE" && LIBRARY_PATH="$CUDA_LIB${LIBRARY_PATH:+:$LIBRARY_PATH}" NAT_MM_WITH_CUDA=1 \
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext \
  --inplace >"$OUT_DIR/build.log" 2>&1) || { say "build failed: $OUT_DIR/build.log"; exit 1; }

say "gpu_check.sh on the build (no GPU: its CUDA tests skip)"
OUT="$OUT_DIR/gpu_check" PYTHON="$VENV/bin/python" GPU_CHECK_REUSE_BUILD=1 \
  GPU_CHECK_BUDGET_S=1200 bash "$TREE/tools/gpu_check.sh" >"$OUT_DIR/gpu_check.log" 2>&1
grep -E "^  (build|tests) |FAILED" "$OUT_DIR/gpu_check.log"
# without a GPU the verdict is NOT OK by design (no benchmark); the tests must pass
grep -qE "^  tests +passed" "$OUT_DIR/gpu_check.log"
CHECK=$?

say "the whole test suite"
(cd "$TREE" && "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider -rf \
  --continue-on-collection-errors >"$OUT_DIR/tests.log" 2>&1)
SUITE=$?
tail -3 "$OUT_DIR/tests.log"
say "gpu_check tests: $([ $CHECK = 0 ] && echo passed || echo FAILED)," \
  "test suite: $([ $SUITE = 0 ] && echo passed || echo FAILED) (logs in $OUT_DIR)"
[ $CHECK = 0 ] && [ $SUITE = 0 ]
