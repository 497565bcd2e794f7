# NAT-Small + UperNet, ADE20K 512x512, 160k iterations, ImageNet-1k pretrained.
# Published: mIoU 48.0 / 49.5 (single / multi-scale), 82M params, 1010G FLOPs.
_base_ = ['./_base_/upernet_nat.py', './_base_/ade20k_160k.py']

pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='NAT',
        arch='small',
        kernel_size=7,
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
