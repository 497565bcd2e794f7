# Mask R-CNN + FPN with a NAT / DiNAT backbone (model only).
# Backbone outputs: channels [C, 2C, 4C, 8C] at strides [4, 8, 16, 32].
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='NAT',
        arch='mini',
        kernel_size=7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False),
    neck=dict(in_channels=[64, 128, 256, 512]))
