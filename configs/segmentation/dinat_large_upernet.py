# DiNAT-Large + UperNet, ADE20K 640x640, 160k iterations, ImageNet-22k pretrained.
# Published: mIoU 54.0 / 54.9 (single / multi-scale), 238M params, 2335G FLOPs.
_base_ = ['./_base_/upernet_nat.py', './_base_/ade20k_640x640_160k.py']

pretrained = 'https://shi-labs.com/projects/dinat/checkpoints/imagenet22k/dinat_large_in22k_224.pth'  # noqa: E501

model = dict(
    data_preprocessor=dict(size=(640, 640)),
    backbone=dict(
        type='DiNAT',
        arch='large',
        kernel_size=7,
        dilations=[
            [1, 20, 1],
            [1, 5, 1, 10],
            [1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5],
            [1, 2, 1, 2, 1],
        ],
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768))

# As upstream: DiNAT-Large is trained without fp16 mixed precision.
optim_wrapper = dict(type='OptimWrapper')
