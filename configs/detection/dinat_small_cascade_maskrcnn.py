# DiNAT-Small + Cascade Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale + crop), ImageNet-1k pretrained.
# Published: box AP 52.9 / mask AP 45.8, 108M params, 809G FLOPs.
_base_ = ['./_base_/cascade_mask_rcnn_nat_fpn.py', './_base_/coco_instance_ms_crop_3x.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='small',
        kernel_size=7,
        dilations='coco',  # nat_mm.models.presets.DILATION_PRESETS
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
