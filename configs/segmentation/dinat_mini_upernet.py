# DiNAT-Mini + UperNet, ADE20K 512x512, 160k iterations, ImageNet-1k pretrained.
# Published: mIoU 45.8 / 47.2 (single / multi-scale), 50M params, 900G FLOPs.
_base_ = ['./_base_/upernet_nat.py', './_base_/ade20k_160k.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_mini_in1k_224.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='mini',
        kernel_size=7,
        dilations='ade',  # nat_mm.models.presets.DILATION_PRESETS
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
