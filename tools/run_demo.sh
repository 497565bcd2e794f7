#!/usr/bin/env bash
# The out-of-the-box demo (what `make demo` runs), CPU only, no downloads:
#   1. write the synthetic shapes data set (tools/make_demo_data.py -> data/demo/)
#   2. train NAT-Mini + Mask R-CNN from scratch on it (tools/train.py, mmengine log)
#   3. evaluate the final checkpoint on the val split (tools/test.py: COCO bbox/segm mAP)
#   4. draw the predictions on a val image (tools/image_demo.py -> PNG)
#   5. print the metrics, the times and where the picture is
# Environment: WORK_DIR (default work_dirs/demo), PYTHON (default python),
#   DEMO_SEG=1 also trains and evaluates the segmentation demo (UperNet, mIoU).
#   Extra arguments go to tools/train.py (e.g. --cfg-options train_cfg.max_epochs=4).
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK_DIR=${WORK_DIR:-work_dirs/demo}
DET_CONFIG=configs/detection/nat_mini_maskrcnn_demo.py
SEG_CONFIG=configs/segmentation/nat_mini_upernet_demo.py
DET_DIR=$WORK_DIR/det
SEG_DIR=$WORK_DIR/seg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stamp() { date +%s; }
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
T0=$(stamp)

say "[0/4] checking the environment"
if ! $PY -c "import mmcv, mmdet, mmseg, mmengine, pycocotools" 2>/dev/null; then
    echo "mmcv/mmdet/mmseg/pycocotools are missing: install them first (make install)." >&2
    exit 1
fi
$PY - <<'PYEOF'
import warnings
warnings.simplefilter('ignore')
import torch, mmcv, mmdet, mmseg, mmengine, nat_mm
from nat_mm.ops import backend_info
info = backend_info()
print(f'torch {torch.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, nat_mm {nat_mm.__version__}, '
      f'{torch.get_num_threads()} CPU threads')
print(f'neighborhood attention backend: {info}')
if not info.get('extension'):
    print('WARNING: the compiled nat_mm._C extension is missing; the pure-PyTorch '
          'fallback is much slower. Build it: pip install -e . --no-build-isolation')
PYEOF

say "[1/4] making the synthetic data sets (data/demo)"
$PY tools/make_demo_data.py --out data/demo
T1=$(stamp)

say "[2/4] training NAT-Mini + Mask R-CNN from scratch ($DET_CONFIG)"
$PY tools/train.py "$DET_CONFIG" --work-dir "$DET_DIR" "$@"
T2=$(stamp)
CKPT=$(cat "$DET_DIR/last_checkpoint")

say "[3/4] evaluating $CKPT on the val split"
$PY tools/test.py "$DET_CONFIG" "$CKPT" --work-dir "$DET_DIR" \
    --metrics-out "$DET_DIR/metrics.json"
T3=$(stamp)

say "[4/4] drawing predictions on a val image"
PICTURE=$DET_DIR/demo_pred.png
$PY tools/image_demo.py data/demo/coco/val/000000.jpg "$DET_CONFIG" "$CKPT" \
    --out-file "$PICTURE" --upscale 3
T4=$(stamp)

SEG_LINE=""
if [ "${DEMO_SEG:-0}" = "1" ]; then
    say "[seg] training NAT-Mini + UperNet from scratch ($SEG_CONFIG)"
    $PY tools/train.py "$SEG_CONFIG" --work-dir "$SEG_DIR"
    SEG_CKPT=$(cat "$SEG_DIR/last_checkpoint")
    $PY tools/test.py "$SEG_CONFIG" "$SEG_CKPT" --work-dir "$SEG_DIR" \
        --metrics-out "$SEG_DIR/metrics.json"
    $PY tools/image_demo.py data/demo/ade/images/validation/000000.jpg "$SEG_CONFIG" \
        "$SEG_CKPT" --out-file "$SEG_DIR/demo_pred.png" --upscale 3
    SEG_LINE=$($PY -c "import json; m=json.load(open('$SEG_DIR/metrics.json')); print(f\"segmentation: mIoU {m['mIoU']:.2f}, aAcc {m['aAcc']:.2f}, mAcc {m['mAcc']:.2f}; picture $SEG_DIR/demo_pred.png\")")
fi
T5=$(stamp)

say "demo finished"
$PY - "$DET_DIR/metrics.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
get = lambda k: m.get(f'coco/{k}', float('nan'))
print(f"detection (val split, {sys.argv[1]}):")
print(f"  bbox mAP {get('bbox_mAP'):.3f}  (AP50 {get('bbox_mAP_50'):.3f}, AP75 {get('bbox_mAP_75'):.3f})")
print(f"  segm mAP {get('segm_mAP'):.3f}  (AP50 {get('segm_mAP_50'):.3f}, AP75 {get('segm_mAP_75'):.3f})")
PYEOF
[ -n "$SEG_LINE" ] && echo "$SEG_LINE"
echo "times: data $((T1 - T0))s, training $((T2 - T1))s, evaluation $((T3 - T2))s, picture $((T4 - T3))s${SEG_LINE:+, segmentation demo $((T5 - T4))s}; total $((T5 - T0))s"
echo "picture: $PICTURE"
echo "checkpoint: $CKPT"
