#!/usr/bin/env bash
# Installs everything nat_mm needs on a fresh machine, then nat_mm itself. Idempotent:
# what is already there (torch, mmcv with its compiled ops, ...) is kept.
#   torch      kept if importable, else torch==2.13.0 (CPU build; install a CUDA build of
#              torch yourself first for GPUs, then run this)
#   mm stack   mmengine 0.10.7, mmcv 2.1.0 built from source WITH ops (~10 min on 2 cores
#              the first time; pip caches the wheel), mmdet 3.3.0, mmsegmentation 1.2.2
#   ONNX       onnx, onnxscript, onnxruntime (tools/export_onnx.py), bounded above by
#              the newest versions tested (onnxscript follows torch's exporter closely)
#   nat_mm     pip install -e . --no-build-isolation (builds nat_mm._C: C++ kernels, plus
#              CUDA kernels when torch has CUDA and nvcc exists)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
say() { printf '==> %s\n' "$*"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    say "torch (CPU build 2.13.0)"
    pip_install torch==2.13.0
fi
say "torch $("$PY" -c 'import torch; print(torch.__version__)')"
# After torch: its install takes the newest setuptools (torch 2.13 asks for >= 77.0.3), and
# setuptools 81+ has no pkg_resources, which mmcv 2.1.0's setup.py imports.
say "build tools"
pip_install "setuptools>=77.0.3,<81" wheel ninja
# Upper bounds: the newest releases CI has passed with (a new major release of a test or
# export dependency should not turn CI red on its own; raise a bound after a green run).
pip_install "mmengine==0.10.7" "numpy<3" "pytest<10" "hypothesis<7" "matplotlib<4" \
    "pycocotools<3" "ftfy" "regex" "psutil"
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
    say "mmcv 2.1.0 with ops, from source (about 10 minutes on 2 cores the first time)"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation "mmcv==2.1.0"
fi
pip_install "mmdet==3.3.0" "mmsegmentation==1.2.2"
say "ONNX export (tools/export_onnx.py) and its check"
pip_install "onnx>=1.16,<1.24" "onnxscript>=0.4,<0.8" "onnxruntime>=1.19,<1.33"
say "nat_mm (builds the C++/CUDA extension)"
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation -e .
"$PY" -c "import nat_mm; from nat_mm.ops import backend_info; print('nat_mm', nat_mm.__version__, backend_info())"
