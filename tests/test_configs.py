"""Every config in configs/ loads, builds its model (backbone pretrained init skipped)
and runs a ``loss`` and a ``predict`` forward on a tiny input; the full-size models have
the parameter counts of the NAT / DiNAT papers' tables."""
import copy
import gc
import glob
import os
import os.path as osp

import pytest
import torch

mmdet = pytest.importorskip('mmdet')
mmseg = pytest.importorskip('mmseg')

from mmengine.config import Config  # noqa: E402
from mmengine.model.utils import revert_sync_batchnorm  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '*', '*.py')))

# Published parameter counts (millions, as rounded in the papers' tables).
PUBLISHED_PARAMS_M = {
    'nat_mini_maskrcnn': 40, 'nat_tiny_maskrcnn': 48, 'nat_small_maskrcnn': 70,
    'dinat_mini_maskrcnn': 40, 'dinat_tiny_maskrcnn': 48, 'dinat_small_maskrcnn': 70,
    'nat_mini_cascade_maskrcnn': 77, 'nat_tiny_cascade_maskrcnn': 85,
    'nat_small_cascade_maskrcnn': 108, 'nat_base_cascade_maskrcnn': 147,
    'dinat_mini_cascade_maskrcnn': 77, 'dinat_tiny_cascade_maskrcnn': 85,
    'dinat_small_cascade_maskrcnn': 108, 'dinat_base_cascade_maskrcnn': 147,
    'dinat_large_cascade_maskrcnn': 258,
    'nat_mini_upernet': 50, 'nat_tiny_upernet': 58, 'nat_small_upernet': 82,
    'nat_base_upernet': 123, 'dinat_mini_upernet': 50, 'dinat_tiny_upernet': 58,
    'dinat_small_upernet': 82, 'dinat_base_upernet': 123, 'dinat_large_upernet': 238,
}


def test_all_configs_found():
    names = {osp.splitext(osp.basename(c))[0] for c in CONFIGS}
    for fam in ('nat', 'dinat'):
        for arch in ('mini', 'tiny', 'small', 'base'):
            for kind in ('maskrcnn', 'cascade_maskrcnn', 'upernet'):
                assert f'{fam}_{arch}_{kind}' in names
    for extra in ('dinat_large_cascade_maskrcnn', 'dinat_large_upernet',
                  'nat_mini_maskrcnn_demo', 'nat_mini_upernet_demo'):
        assert extra in names


def _load(path):
    cfg = Config.fromfile(osp.join(REPO, path))
    assert cfg.get('custom_imports', {}).get('imports') == ['nat_mm']
    return cfg


def _build(cfg):
    from mmengine.registry import MODELS
    scope = cfg.default_scope
    init_default_scope(scope)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.init_cfg = None
    model = MODELS.build(model_cfg)  # default (random) init; init_weights() is not needed
    return revert_sync_batchnorm(model)


def _shrink_det_sampling(cfg):
    """Few RoIs, so that the big cascade heads stay cheap on a CPU."""
    train_cfg = cfg.model.train_cfg
    train_cfg.rpn_proposal.max_per_img = 64
    rcnn = train_cfg.rcnn if isinstance(train_cfg.rcnn, list) else [train_cfg.rcnn]
    for stage in rcnn:
        stage.sampler.num = 32
    cfg.model.test_cfg.rpn.max_per_img = 32


def _seg_inputs(num_classes, size, batch_size=1):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size), scale_factor=(1., 1.)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, size, size), generator=g))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _check_losses(losses):
    total = 0.
    for name, value in losses.items():
        if 'loss' not in name:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            assert torch.isfinite(v).all(), f'{name} is not finite: {v}'
            total = total + v.sum()
    assert torch.is_tensor(total) and total.requires_grad
    return total


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_and_runs(path):
    cfg = _load(path)
    name = osp.splitext(osp.basename(path))[0]
    scope = cfg.default_scope
    assert scope in ('mmdet', 'mmseg')
    assert cfg.model.backbone.type in ('NAT', 'DiNAT')
    demo = name.endswith('_demo')
    if demo:
        assert cfg.model.backbone.init_cfg is None  # no download in the demo
    else:
        assert cfg.model.backbone.init_cfg.type == 'Pretrained'
        assert cfg.model.backbone.init_cfg.checkpoint.startswith('https://shi-labs.com/')
    torch.manual_seed(0)
    size = 96
    if scope == 'mmdet':
        _shrink_det_sampling(cfg)
    else:
        # the recipes pad every input to the 512 (640) crop size; keep the test tiny
        cfg.model.data_preprocessor.size = (size, size)
    model = _build(cfg)

    n_params = sum(p.numel() for p in model.parameters())
    if name in PUBLISHED_PARAMS_M:
        assert round(n_params / 1e6) == PUBLISHED_PARAMS_M[name], (
            f'{name}: {n_params / 1e6:.2f}M params, published '
            f'{PUBLISHED_PARAMS_M[name]}M')

    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        num_classes = cfg.model.roi_head.mask_head.num_classes
        packed = demo_mm_inputs(batch_size=1, image_shapes=[(3, size, size)],
                                num_items=[2], num_classes=num_classes, with_mask=True)
    else:
        num_classes = cfg.model.decode_head.num_classes
        # 2 images: the PSP module's 1x1 pooled BatchNorm needs > 1 value per channel
        packed = _seg_inputs(num_classes, size, batch_size=2)

    model.train()
    data = model.data_preprocessor(copy.deepcopy(packed), True)
    losses = model(**data, mode='loss')
    _check_losses(losses).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(copy.deepcopy(packed), False)
        results = model(**data, mode='predict')
    assert len(results) == len(packed['inputs'])
    if scope == 'mmdet':
        inst = results[0].pred_instances
        assert inst.bboxes.shape[1] == 4 and len(inst.scores) == len(inst.labels)
        assert 'masks' in inst
    else:
        seg = results[0].pred_sem_seg.data
        assert seg.shape[-2:] == (size, size)
        assert int(seg.max()) < num_classes
    del model, data, losses, results
    gc.collect()


@pytest.mark.parametrize('path', [c for c in CONFIGS if c.endswith('_demo.py')])
def test_demo_configs_are_cpu_friendly(path):
    cfg = _load(path)
    assert cfg.optim_wrapper.type == 'OptimWrapper'  # AmpOptimWrapper needs a GPU
    assert cfg.train_dataloader.dataset.data_root.startswith('data/demo/')


@pytest.mark.parametrize('path', [c for c in CONFIGS if not c.endswith('_demo.py')])
def test_recipe_settings(path):
    """The papers' recipes (NAT_REFERENCE.md §4)."""
    cfg = _load(path)
    name = osp.splitext(osp.basename(path))[0]
    large = '_large_' in name
    ow = cfg.optim_wrapper
    assert ow.type == ('OptimWrapper' if large else 'AmpOptimWrapper')
    assert ow.optimizer.type == 'AdamW'
    assert ow.paramwise_cfg.custom_keys['rpb'].decay_mult == 0.
    assert ow.paramwise_cfg.custom_keys['norm'].decay_mult == 0.
    if cfg.default_scope == 'mmdet':
        assert cfg.data_root == 'data/coco/'
        assert ow.optimizer.lr == (7.5e-5 if large else 1e-4)
        assert ow.optimizer.weight_decay == 0.05
        assert cfg.train_cfg.max_epochs == 36
        warmup, steps = cfg.param_scheduler
        assert (warmup.type, warmup.end, warmup.start_factor) == ('LinearLR', 500, 0.001)
        assert steps.milestones == [27, 33]
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs
        if 'cascade' in name:
            for head in cfg.model.roi_head.bbox_head:
                assert head.type == 'ConvFCBBoxHead' and head.num_shared_convs == 4
                assert head.num_shared_fcs == 1
                assert head.norm_cfg.type == 'SyncBN'
                assert head.loss_bbox.type == 'GIoULoss' and head.loss_bbox.loss_weight == 10.
    else:
        assert cfg.data_root == 'data/ade/ADEChallengeData2016'
        assert ow.optimizer.lr == 6e-5 and ow.optimizer.weight_decay == 0.01
        assert cfg.train_cfg.max_iters == 160000
        warmup, poly = cfg.param_scheduler
        assert (warmup.end, warmup.start_factor) == (1500, 1e-6)
        assert (poly.type, poly.power, poly.eta_min) == ('PolyLR', 1.0, 0.0)
        assert cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
        crop = 640 if large else 512
        assert cfg.crop_size == (crop, crop)
        assert cfg.model.data_preprocessor.size == (crop, crop)
