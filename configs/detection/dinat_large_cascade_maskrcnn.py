# DiNAT-Large + Cascade Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale + crop), ImageNet-22k pretrained.
# Published: box AP 55.3 / mask AP 47.8, 258M params, 1276G FLOPs.
_base_ = ['./_base_/cascade_mask_rcnn_nat_fpn.py', './_base_/coco_instance_ms_crop_3x.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet22k/dinat_large_in22k_224.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='large',
        kernel_size=7,
        dilations='coco',  # nat_mm.models.presets.DILATION_PRESETS
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768, 1536]))

# As upstream: DiNAT-Large is trained without fp16 mixed precision.
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=7.5e-05))
