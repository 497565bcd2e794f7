"""End-to-end runs of the tools on tiny synthetic data (CPU, a few iterations each):

* detection and segmentation: tools/train.py -> checkpoints -> --resume -> tools/test.py
  (metrics, --out, --show-dir), then tools/image_demo.py on the checkpoint;
* distributed: tools/dist_train.sh (torchrun --nproc_per_node=2, gloo on CPU);
* mmdet's and mmseg's own tools/train.py train the demo configs unchanged;
* tools/get_flops.py, tools/benchmark_inference.py and every tool's --help.

Each run is a subprocess in a temporary folder holding data/demo/, so the configs'
relative data paths resolve there.
"""
import glob
import json
import os
import os.path as osp
import socket
import subprocess
import sys
import warnings

import pytest

pytest.importorskip('mmdet')
pytest.importorskip('mmseg')
pytest.importorskip('pycocotools')

from nat_mm import safe_load  # noqa: E402
from test_safe_load import globals_beyond_torch_defaults  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(REPO, 'tools')
DET_CFG = osp.join(REPO, 'configs', 'detection', 'nat_mini_maskrcnn_demo.py')
SEG_CFG = osp.join(REPO, 'configs', 'segmentation', 'nat_mini_upernet_demo.py')
TIMEOUT = 600

# tiny loaders: no worker processes (start-up would dominate a few iterations)
LOADERS = [f'{split}_dataloader.{key}' for split in ('train', 'val', 'test')
           for key in ('num_workers=0', 'persistent_workers=False')]
DET_FAST = ['train_dataloader.batch_size=2', 'default_hooks.logger.interval=1',
            'model.train_cfg.rpn_proposal.max_per_img=64',
            'model.train_cfg.rcnn.sampler.num=32'] + LOADERS
SEG_FAST = ['train_dataloader.batch_size=2', 'default_hooks.logger.interval=1'] + LOADERS


def _env(threads=2):
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    env.setdefault('OMP_NUM_THREADS', str(threads))  # an explicit setting wins
    env.setdefault('MPLBACKEND', 'Agg')
    return env


def run(args, cwd, threads=2, expect_ok=True):
    proc = subprocess.run(args, cwd=cwd, env=_env(threads), capture_output=True,
                          text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f'{" ".join(map(str, args))} failed ({proc.returncode}):\n'
                             f'{out[-6000:]}')
    return proc.returncode, out


def tool(name, *args, cwd, threads=2, expect_ok=True):
    return run([sys.executable, osp.join(TOOLS, name), *map(str, args)], cwd, threads,
               expect_ok)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A folder with tiny demo data sets under data/demo (both tasks)."""
    root = tmp_path_factory.mktemp('e2e')
    tool('make_demo_data.py', '--out', 'data/demo', '--num-train', 12, '--num-val', 4,
         '--img-size', 96, '--seg-num-train', 8, '--seg-num-val', 4,
         '--seg-img-size', 64, cwd=root)
    assert osp.isfile(root / 'data/demo/coco/annotations/instances_train.json')
    assert len(os.listdir(root / 'data/demo/ade/annotations/validation')) == 4
    return root


# ----------------------------------------------------------------------------- detection
@pytest.fixture(scope='module')
def det_run(workspace):
    """2 epochs of 6 iterations, a checkpoint per epoch, validation at the end."""
    wd = workspace / 'det'
    _, out = tool('train.py', DET_CFG, '--work-dir', wd, '--cfg-options',
                  'train_cfg.max_epochs=2', 'train_cfg.val_interval=2',
                  'default_hooks.checkpoint.interval=1', *DET_FAST, cwd=workspace)
    return wd, out


def test_det_train_writes_checkpoints_and_validates(det_run):
    wd, out = det_run
    assert osp.isfile(wd / 'epoch_1.pth') and osp.isfile(wd / 'epoch_2.pth')
    assert 'Epoch(train)' in out and 'loss_mask' in out  # mmengine progress log
    assert 'coco/bbox_mAP' in out                        # validation ran
    with open(wd / 'last_checkpoint') as f:
        assert f.read().strip().endswith('epoch_2.pth')


def test_det_resume(det_run, workspace):
    wd, _ = det_run
    code, out = tool('train.py', DET_CFG, '--work-dir', workspace / 'det_resume',
                     '--resume', wd / 'epoch_1.pth', '--cfg-options',
                     'train_cfg.max_epochs=2', 'train_cfg.val_interval=10',
                     *DET_FAST, cwd=workspace, expect_ok=False)
    # resume loads mmengine's own checkpoint with torch.load(weights_only=True) (torch >= 2.6)
    assert 'Weights only load failed' not in out, out[-6000:]
    assert code == 0, out[-6000:]
    assert 'resumed epoch: 1' in out
    assert osp.isfile(workspace / 'det_resume' / 'epoch_2.pth')
    assert not osp.isfile(workspace / 'det_resume' / 'epoch_1.pth')  # started at epoch 2


def test_det_test_tool(det_run, workspace):
    wd, _ = det_run
    metrics = workspace / 'det_metrics.json'
    preds = workspace / 'det_preds.pkl'
    tool('test.py', DET_CFG, wd / 'epoch_2.pth', '--work-dir', workspace / 'det_test',
         '--out', preds, '--show-dir', 'vis', '--metrics-out', metrics,
         '--cfg-options', *LOADERS, cwd=workspace)
    with open(metrics) as f:
        m = json.load(f)
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert key in m and -1 <= m[key] <= 1
    assert osp.getsize(preds) > 0
    assert len(glob.glob(str(workspace / 'det_test' / '*' / 'vis' / '*.jpg'))) == 4
    # argument errors are named before the runner is built, without a traceback
    for args, message in [(('missing.pth', ), "checkpoint 'missing.pth' not found"),
                          ((wd / 'epoch_2.pth', '--out', 'preds.json'),
                           '--out for detection must be a .pkl file')]:
        rc, out = tool('test.py', DET_CFG, *args, '--work-dir', workspace / 'det_bad',
                       cwd=workspace, expect_ok=False)
        assert rc == 1 and message in out and 'Traceback' not in out, out[-3000:]
    assert not osp.exists(workspace / 'det_bad')


def test_det_image_demo(det_run, workspace):
    wd, _ = det_run
    out_file = workspace / 'det_pred.png'
    _, out = tool('image_demo.py', workspace / 'data/demo/coco/val/000000.jpg', DET_CFG,
                  wd / 'epoch_2.pth', '--out-file', out_file, '--score-thr', 0.0,
                  cwd=workspace)
    assert osp.getsize(out_file) > 0 and 'saved' in out
    import cv2
    assert cv2.imread(str(out_file)).shape[:2] == (96, 96)


# ----------------------------------------------------------------------------- segmentation
@pytest.fixture(scope='module')
def seg_run(workspace):
    wd = workspace / 'seg'
    _, out = tool('train.py', SEG_CFG, '--work-dir', wd, '--cfg-options',
                  'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
                  'default_hooks.checkpoint.interval=2', 'param_scheduler.0.end=2',
                  'param_scheduler.1.begin=2', 'param_scheduler.1.end=4',
                  *SEG_FAST, cwd=workspace)
    return wd, out


def test_seg_train_writes_checkpoints_and_validates(seg_run):
    wd, out = seg_run
    assert osp.isfile(wd / 'iter_2.pth') and osp.isfile(wd / 'iter_4.pth')
    assert 'Iter(train)' in out and 'decode.loss_ce' in out
    assert 'mIoU' in out


def test_seg_resume(seg_run, workspace):
    wd, _ = seg_run
    code, out = tool('train.py', SEG_CFG, '--work-dir', workspace / 'seg_resume',
                     '--resume', wd / 'iter_2.pth', '--cfg-options',
                     'train_cfg.max_iters=4', 'train_cfg.val_interval=100',
                     'default_hooks.checkpoint.interval=2',
                     *SEG_FAST,
                     cwd=workspace, expect_ok=False)
    # resume loads mmengine's own checkpoint with torch.load(weights_only=True) (torch >= 2.6)
    assert 'Weights only load failed' not in out, out[-6000:]
    assert code == 0, out[-6000:]
    assert 'resumed epoch: 0, iter: 2' in out
    assert osp.isfile(workspace / 'seg_resume' / 'iter_4.pth')
    assert not osp.isfile(workspace / 'seg_resume' / 'iter_2.pth')
    # everything a real training checkpoint needs beyond torch's defaults is allow-listed
    assert globals_beyond_torch_defaults(workspace / 'seg_resume' / 'iter_4.pth') <= set(
        safe_load.allowed_mm_globals())


def test_seg_test_tool_and_image_demo(seg_run, workspace):
    wd, _ = seg_run
    metrics = workspace / 'seg_metrics.json'
    tool('test.py', SEG_CFG, wd / 'iter_4.pth', '--work-dir', workspace / 'seg_test',
         '--out', workspace / 'seg_pred_maps', '--show-dir', workspace / 'seg_vis',
         '--metrics-out', metrics, '--cfg-options', *LOADERS, cwd=workspace)
    with open(metrics) as f:
        m = json.load(f)
    assert {'aAcc', 'mIoU', 'mAcc'} <= set(m)
    assert len(os.listdir(workspace / 'seg_pred_maps')) == 4
    assert len(glob.glob(str(workspace / 'seg_vis' / '**' / '*.png'), recursive=True)) >= 4
    out_file = workspace / 'seg_pred.png'
    tool('image_demo.py', workspace / 'data/demo/ade/images/validation/000000.jpg',
         SEG_CFG, wd / 'iter_4.pth', '--out-file', out_file, cwd=workspace)
    assert osp.getsize(out_file) > 0


# ----------------------------------------------------------------------------- distributed
def _gloo_abort_before_training(out):
    """A rank aborted by std::terminate before the first logged iteration. Seen once in ~15
    CI runs here (2026-11-28, rank 1 right after DDP's setup, no backtrace): most likely
    gloo's TCP setup throwing from a background thread (upstream reports of such aborts:
    pytorch/pytorch#188266, pytorch/gloo#514); not diagnosed further. The same abort at
    the end of a run (3 of 8 runs on 2026-12-07, after validation) was interpreter
    finalization racing with gloo's worker threads (tools/_common.end_distributed_process
    says how); train.py and test.py now end without it, and such an abort fails
    this test."""
    return ('terminate called without an active exception' in out
            and 'exitcode  : -6' in out and 'Epoch(train)' not in out)


def _training_progress(out):
    """The last iteration line the ranks logged, to say where a failed run stopped."""
    lines = [line for line in out.splitlines() if 'Epoch(' in line]
    return lines[-1].strip() if lines else 'no iteration logged'


def test_dist_train_two_processes_gloo(workspace):
    """torchrun --nproc_per_node=2 on CPU (gloo), as tools/dist_train.sh launches it."""
    for attempt in range(2):  # one retry, only for an abort inside gloo's setup
        wd = workspace / f'det_dist{attempt}'
        args = ['bash', osp.join(TOOLS, 'dist_train.sh'), DET_CFG, '2', '--work-dir', str(wd),
                '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                *DET_FAST]
        env = _env(threads=1)
        env['PORT'] = str(_free_port())
        proc = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or attempt == 1 or not _gloo_abort_before_training(out):
            break
        warnings.warn('a rank aborted in gloo before training started; retrying once')
    assert proc.returncode == 0, f'stopped at: {_training_progress(out)}\n{out[-6000:]}'
    assert osp.isfile(wd / 'epoch_1.pth')
    # 12 images, 2 processes x 2 images: 3 iterations per epoch (not 6)
    assert 'Epoch(train) [1][3/3]' in out
    assert 'coco/bbox_mAP' in out


# ----------------------------------------------------------------------------- mm's own tools
def _mm_tool(package, name):
    path = osp.join(osp.dirname(__import__(package).__file__), '.mim', 'tools', name)
    if not osp.isfile(path):
        pytest.skip(f'the installed {package} ships no tools/{name}')
    return path


def test_mmdet_own_train_tool(workspace):
    """mmdet's tools/train.py runs the demo config unchanged (plugin via custom_imports)."""
    wd = workspace / 'det_mmdet_tool'
    run([sys.executable, _mm_tool('mmdet', 'train.py'), DET_CFG, '--work-dir', str(wd),
         '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=10',
         *DET_FAST], cwd=workspace)
    assert osp.isfile(wd / 'epoch_1.pth')


def test_mmseg_own_train_tool(workspace):
    wd = workspace / 'seg_mmseg_tool'
    run([sys.executable, _mm_tool('mmseg', 'train.py'), SEG_CFG, '--work-dir', str(wd),
         '--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
         'default_hooks.checkpoint.interval=2',
         *SEG_FAST], cwd=workspace)
    assert osp.isfile(wd / 'iter_2.pth')


# ----------------------------------------------------------------------------- other tools
def test_get_flops(workspace):
    _, out = tool('get_flops.py', DET_CFG, '--shape', 128, cwd=workspace)
    assert 'Flops:' in out and 'Params:' in out
    _, out = tool('get_flops.py', SEG_CFG, '--shape', 64, '--backbone-only', cwd=workspace)
    assert 'Flops:' in out


def test_benchmark_inference(workspace):
    _, out = tool('benchmark_inference.py', DET_CFG, '--shape', 96, '--num-iters', 2,
                  '--num-warmup', 1, cwd=workspace)
    assert 'images/s' in out


@pytest.mark.parametrize('name', ['train.py', 'test.py', 'get_flops.py', 'image_demo.py',
                                  'benchmark_inference.py', 'make_demo_data.py',
                                  'dist_train.sh', 'dist_test.sh', 'dist_launch.sh',
                                  'slurm_train.sh', 'run_demo.sh'])
def test_tool_help(name, tmp_path):
    cmd = ['bash'] if name.endswith('.sh') else [sys.executable]
    _, out = run(cmd + [osp.join(TOOLS, name), '--help'], cwd=tmp_path)
    assert 'usage' in out.lower() or name.endswith('.sh')
    assert len(out.strip()) > 50


@pytest.mark.parametrize('name, args, message', [
    ('convert_checkpoint.py', ['in.pth', 'out.pth', '--kernel-size', '4'],
     "argument --kernel-size: 4 is not an odd int >= 3"),
    ('benchmark_inference.py', [DET_CFG, '--num-iters', '0'],
     'argument --num-iters: 0 is not an int >= 1'),
    ('benchmark_inference.py', [DET_CFG, '--batch-size', 'x'],
     "argument --batch-size: 'x' is not an int"),
    ('test.py', [DET_CFG, 'none.pth', '--tta'],
     'no test-time augmentation for instance segmentation'),
])
def test_tool_refuses_bad_arguments_up_front(name, args, message, tmp_path):
    code, out = tool(name, *args, cwd=tmp_path, expect_ok=False)
    assert code != 0 and message in out, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]

