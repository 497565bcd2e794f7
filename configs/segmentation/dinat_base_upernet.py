# DiNAT-Base + UperNet, ADE20K 512x512, 160k iterations, ImageNet-1k pretrained.
# Published: mIoU 49.6 / 50.4 (single / multi-scale), 123M params, 1137G FLOPs.
_base_ = ['./_base_/upernet_nat.py', './_base_/ade20k_160k.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_base_in1k_224.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='base',
        kernel_size=7,
        dilations='ade',  # nat_mm.models.presets.DILATION_PRESETS
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
