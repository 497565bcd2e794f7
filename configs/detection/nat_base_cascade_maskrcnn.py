# NAT-Base + Cascade Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale + crop), ImageNet-1k pretrained.
# Published: box AP 52.3 / mask AP 45.1, 147M params, 931G FLOPs.
_base_ = ['./_base_/cascade_mask_rcnn_nat_fpn.py', './_base_/coco_instance_ms_crop_3x.py']

pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_base.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='NAT',
        arch='base',
        kernel_size=7,
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
