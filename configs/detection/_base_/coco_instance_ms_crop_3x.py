# COCO instance segmentation, 3x (36 epochs) recipe of the NAT / DiNAT papers:
# multi-scale + crop augmentation, AdamW (lr 1e-4, wd 0.05, no decay on rpb / norm),
# 500-iter linear warmup, steps at epochs 27 and 33, total batch 16, fp16 mixed precision.
# Data, schedule and runtime only; the model comes from mask_rcnn_nat_fpn.py or
# cascade_mask_rcnn_nat_fpn.py.
_base_ = [
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

custom_imports = dict(imports=['nat_mm'], allow_failed_imports=False)

data_root = 'data/coco/'
backend_args = None

# Augmentation strategy of DETR / Sparse R-CNN, as used by NAT, Swin and ConvNeXt.
# Padding to a multiple of 32 is done by the model's DetDataPreprocessor.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [
                dict(
                    type='RandomChoiceResize',
                    scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                            (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                            (736, 1333), (768, 1333), (800, 1333)],
                    keep_ratio=True)
            ],
            [
                dict(
                    type='RandomChoiceResize',
                    scales=[(400, 1333), (500, 1333), (600, 1333)],
                    keep_ratio=True),
                dict(
                    type='RandomCrop',
                    crop_type='absolute_range',
                    crop_size=(384, 600),
                    allow_negative_crop=True),
                dict(
                    type='RandomChoiceResize',
                    scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                            (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                            (736, 1333), (768, 1333), (800, 1333)],
                    keep_ratio=True)
            ],
        ]),
    dict(type='PackDetInputs')
]
# 8 GPUs x 2 images = 16 images per iteration, the papers' total batch.
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1)
]

# fp16 mixed precision (AmpOptimWrapper needs a GPU; pass
# `--cfg-options optim_wrapper.type=OptimWrapper` to train in fp32).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'rpb': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))

# lr above is for a total batch of 16: `tools/train.py --auto-scale-lr` rescales it
# linearly to (GPUs x batch_size).
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Save and restore the random-generator states in checkpoints, so that --resume continues
# the run exactly (mmengine re-seeds on resume; see docs/reliability.md).
custom_hooks = [dict(type='RNGStateHook')]
