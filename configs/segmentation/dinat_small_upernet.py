# DiNAT-Small + UperNet, ADE20K 512x512, 160k iterations, ImageNet-1k pretrained.
# Published: mIoU 48.9 / 49.9 (single / multi-scale), 82M params, 1010G FLOPs.
_base_ = ['./_base_/upernet_nat.py', './_base_/ade20k_160k.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth'  # noqa: E501

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='small',
        kernel_size=7,
        dilations='ade',  # nat_mm.models.presets.DILATION_PRESETS
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
