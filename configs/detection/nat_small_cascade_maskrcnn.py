# NAT-Small + Cascade Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale + crop), ImageNet-1k pretrained.
# Published: box AP 52.0 / mask AP 44.9, 108M params, 809G FLOPs.
_base_ = ['./_base_/cascade_mask_rcnn_nat_fpn.py', './_base_/coco_instance_ms_crop_3x.py']

pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='NAT',
        arch='small',
        kernel_size=7,
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
