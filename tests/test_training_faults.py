"""Training faults (issue 7): Mask R-CNN (mmdet) and UperNet (mmseg) with a NAT-Mini
backbone take training steps on

* a NaN loss (a NaN pixel in the batch, and a NaN backbone weight),
* an image without any ground truth,
* a tiny 32x32 image (smaller than kernel_size at the deeper levels),
* an elongated 64x1600 image,

without crashing inside nat_mm. Faults in the data are mm's to report (a NaN loss is
logged/propagated, that is mm's behaviour); whatever happens must not be an exception
raised from nat_mm code. The models come from the demo configs, with shallow depths.
"""
import os
import traceback

import pytest
import torch

import nat_mm  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAT_MM_DIR = os.path.join(REPO, 'nat_mm')
SMALL_BACKBONE = dict(depths=(1, 1, 2, 1), drop_path_rate=0.1)

CASES = ['nan_pixel', 'nan_weight', 'empty_gt', 'tiny_32x32', 'elongated_64x1600']
SIZES = {'nan_pixel': (96, 96), 'nan_weight': (96, 96), 'empty_gt': (96, 96),
         'tiny_32x32': (32, 32), 'elongated_64x1600': (64, 1600)}


def build(task):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    package = 'mmdet' if task == 'det' else 'mmseg'
    pytest.importorskip(package)
    config = os.path.join(REPO, 'configs', 'detection' if task == 'det' else 'segmentation',
                          'nat_mini_maskrcnn_demo.py' if task == 'det'
                          else 'nat_mini_upernet_demo.py')
    cfg = Config.fromfile(config)
    if cfg.get('custom_imports'):  # what the tools do: registers NAT / DiNAT
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    import nat_mm.models  # noqa: F401
    cfg.model.backbone.update(SMALL_BACKBONE)
    cfg.model.backbone.init_cfg = None
    if task == 'seg':
        # let every image size through (the demo pads to a fixed 128x128 crop)
        cfg.model.data_preprocessor.size = None
        cfg.model.data_preprocessor.size_divisor = 32
    if package == 'mmdet':
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    init_default_scope(package)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def fresh_optim(model):
    from mmengine.optim import OptimWrapper
    return OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))


def det_batch(height, width, empty, generator):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    sample = DetDataSample(metainfo=dict(img_shape=(height, width),
                                         ori_shape=(height, width),
                                         pad_shape=(height, width),
                                         scale_factor=(1.0, 1.0), flip=False,
                                         batch_input_shape=(height, width)))
    gt = InstanceData()
    if empty:
        gt.bboxes = torch.zeros(0, 4)
        gt.labels = torch.zeros(0, dtype=torch.long)
        gt.masks = BitmapMasks(torch.zeros(0, height, width, dtype=torch.uint8).numpy(),
                               height, width)
    else:
        boxes = [[2, 2, width // 2, height // 2], [width // 4, height // 4, width - 2,
                                                   height - 2]]
        gt.bboxes = torch.tensor(boxes, dtype=torch.float32)
        gt.labels = torch.tensor([0, 2])
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            masks[i, y1:y2, x1:x2] = 1
        gt.masks = BitmapMasks(masks.numpy(), height, width)
    sample.gt_instances = gt
    return dict(inputs=[image], data_samples=[sample])


def seg_batch(height, width, empty, generator):
    """Two images: UperNet's pooling branch ends in BatchNorm on 1x1 maps, which (like
    any BatchNorm in training) needs more than one value per channel."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, height, width), generator=generator,
                                    dtype=torch.uint8))
        if empty:
            labels = torch.full((1, height, width), 255, dtype=torch.long)  # all ignored
        else:
            labels = torch.randint(0, 4, (1, height, width), generator=generator)
        sample = SegDataSample(metainfo=dict(img_shape=(height, width),
                                             ori_shape=(height, width),
                                             pad_shape=(height, width)))
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


class CountBackbone:
    """Counts backbone forward calls (the step reached our code)."""

    def __init__(self, backbone):
        self.calls = 0
        self.handle = backbone.register_forward_hook(self)  # removed after the step

    def __call__(self, module, args, output):
        self.calls += 1


def raised_in_nat_mm(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(NAT_MM_DIR)


@pytest.fixture(scope='module')
def models():
    return {}


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('task', ['det', 'seg'])
def test_training_step_survives(task, case, models):
    if task not in models:
        models[task] = build(task)
    model, initial = models[task]
    model.load_state_dict(initial)  # every case starts from the same finite weights
    optim = fresh_optim(model)
    height, width = SIZES[case]
    generator = torch.Generator().manual_seed(1)
    make = det_batch if task == 'det' else seg_batch
    data = make(height, width, case == 'empty_gt', generator)
    if case == 'nan_pixel':
        data['inputs'][0] = data['inputs'][0].float()
        data['inputs'][0][:, height // 2, width // 2] = float('nan')
    if case == 'nan_weight':
        weight = model.backbone.levels[0].blocks[0].attn.qkv.weight
        with torch.no_grad():
            weight[0, 0] = float('nan')
    counter = CountBackbone(model.backbone)
    try:
        log_vars = model.train_step(data, optim)
    except Exception as error:  # noqa: BLE001 - the test is about where it was raised
        assert not raised_in_nat_mm(error), ''.join(traceback.format_exception(error))
        assert counter.calls > 0, f'failed before reaching the backbone: {error!r}'
        if case not in ('nan_pixel', 'nan_weight'):
            raise  # valid data must train, whoever raises
        return
    finally:
        optim.zero_grad()
        counter.handle.remove()  # the model is shared across cases
    assert counter.calls > 0
    loss = log_vars['loss']
    if case in ('nan_pixel', 'nan_weight'):
        assert not torch.isfinite(torch.as_tensor(loss)), 'a NaN input must not vanish'
    else:
        assert torch.isfinite(torch.as_tensor(loss)), f'loss {loss} on valid data'


def test_backbone_gradients_on_extreme_shapes():
    """The backbone alone on the odd sizes, forward and backward, finite everywhere."""
    models = pytest.importorskip('nat_mm.models')
    torch.manual_seed(0)
    backbone = models.NAT(arch='mini', **SMALL_BACKBONE)
    for height, width in [(32, 32), (64, 1600), (1600, 64), (33, 47), (4, 4), (1, 1)]:
        images = torch.randn(1, 3, height, width, requires_grad=True)
        feats = backbone(images)
        sum(f.sum() for f in feats).backward()
        assert torch.isfinite(images.grad).all(), (height, width)
        for name, param in backbone.named_parameters():
            if param.grad is not None:
                assert torch.isfinite(param.grad).all(), (height, width, name)
        backbone.zero_grad()
