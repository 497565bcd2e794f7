# DiNAT-Tiny + Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale + crop), ImageNet-1k pretrained.
# Published: box AP 48.6 / mask AP 43.5, 48M params, 258G FLOPs.
_base_ = ['./_base_/mask_rcnn_nat_fpn.py', './_base_/coco_instance_ms_crop_3x.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='tiny',
        kernel_size=7,
        dilations='coco',  # nat_mm.models.presets.DILATION_PRESETS
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
