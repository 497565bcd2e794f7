# Out-of-the-box demo: NAT-Mini + UperNet trained from scratch on the synthetic
# ADE20K-layout shapes data set of tools/make_demo_data.py (4 classes, 128x128), on a CPU.
# Inherits the real recipe (configs/segmentation/nat_mini_upernet.py) and overrides the
# data, image size, schedule, batch, and the head widths (512 -> 128 channels) and norm
# (BN instead of SyncBN) for a CPU.
#   python tools/make_demo_data.py && python tools/train.py configs/segmentation/nat_mini_upernet_demo.py
_base_ = ['./nat_mini_upernet.py']

data_root = 'data/demo/ade'
classes = ('background', 'circle', 'square', 'triangle')
metainfo = dict(classes=classes,
                palette=[(120, 120, 120), (220, 20, 60), (0, 120, 255), (0, 170, 0)])
num_classes = len(classes)
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=None, drop_path_rate=0.1),
    decode_head=dict(channels=128, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(channels=64, num_classes=num_classes, norm_cfg=norm_cfg))

dataset_type = 'BaseSegDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        _dataset,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        _dataset,
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
del _dataset

max_iters = 1600
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=max_iters, by_epoch=False)
]
# fp32 (the recipe's fp16 AmpOptimWrapper needs a GPU); higher lr for a from-scratch run
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=6e-4))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=2))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
