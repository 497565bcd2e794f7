# NAT-Small + Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale + crop), ImageNet-1k pretrained.
# Published: box AP 48.4 / mask AP 43.2, 70M params, 330G FLOPs.
_base_ = ['./_base_/mask_rcnn_nat_fpn.py', './_base_/coco_instance_ms_crop_3x.py']

pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='NAT',
        arch='small',
        kernel_size=7,
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
