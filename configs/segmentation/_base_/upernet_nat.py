# UperNet + auxiliary FCN head with a NAT / DiNAT backbone (model only), ADE20K (150 classes).
# Backbone outputs: channels [C, 2C, 4C, 8C] at strides [4, 8, 16, 32]; the auxiliary head
# reads level 2 (4C channels).
_base_ = ['mmseg::_base_/models/upernet_swin.py']

model = dict(
    data_preprocessor=dict(size=(512, 512)),
    backbone=dict(
        _delete_=True,
        type='NAT',
        arch='mini',
        kernel_size=7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        with_cp=False),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, in_index=2, num_classes=150, loss_decode=dict(loss_weight=0.4)))
