# NAT-Mini + UperNet, ADE20K 512x512, 160k iterations, ImageNet-1k pretrained.
# Published: mIoU 45.1 / 46.4 (single / multi-scale), 50M params, 900G FLOPs.
_base_ = ['./_base_/upernet_nat.py', './_base_/ade20k_160k.py']

pretrained = 'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='NAT',
        arch='mini',
        kernel_size=7,
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
