# Out-of-the-box demo: NAT-Mini + Mask R-CNN trained from scratch on the synthetic
# shapes data set of tools/make_demo_data.py (3 classes, 128x128 images), on a CPU.
# Inherits the real recipe (configs/detection/nat_mini_maskrcnn.py) and overrides only
# the data, image size, schedule, batch and the RoI sampling budget.
#   python tools/make_demo_data.py && python tools/train.py configs/detection/nat_mini_maskrcnn_demo.py
_base_ = ['./nat_mini_maskrcnn.py']

data_root = 'data/demo/coco/'
classes = ('circle', 'square', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 120, 255), (0, 170, 0)])
num_classes = len(classes)
img_scale = (128, 128)

# CPU budget: lighter heads than the COCO recipe (FPN / RoI features 128 channels
# instead of 256, 2 mask convs, a 512-d box head, fewer RoI samples, RoIAlign with 2
# samples per bin). The NAT-Mini backbone is the real one.
head_channels = 128
model = dict(
    # no ImageNet weights: there is no internet; the demo trains from scratch
    backbone=dict(init_cfg=None, drop_path_rate=0.0),
    neck=dict(out_channels=head_channels),
    rpn_head=dict(in_channels=head_channels, feat_channels=head_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(
            out_channels=head_channels,
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=2)),
        bbox_head=dict(in_channels=head_channels, fc_out_channels=512,
                       num_classes=num_classes),
        mask_roi_extractor=dict(
            out_channels=head_channels,
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=2)),
        mask_head=dict(num_convs=2, in_channels=head_channels,
                       conv_out_channels=head_channels, num_classes=num_classes)),
    # small images with few objects: fewer proposals and RoI samples per image
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.8, 1.25), keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# schedule: 100 iterations per epoch (400 images / batch 4)
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[6, 7], gamma=0.1)
]
# fp32 (the recipe's fp16 AmpOptimWrapper needs a GPU); higher lr for a from-scratch run
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=4e-4), clip_grad=dict(max_norm=10.0))
auto_scale_lr = dict(base_batch_size=4)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=2),
    visualization=dict(type='DetVisualizationHook', draw=False))
log_processor = dict(window_size=20)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
