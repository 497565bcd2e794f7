# ADE20K 640x640 crops (resize (2560, 640) ratio 0.5-2.0, cat_max_ratio 0.75, flip,
# photometric distortion), 8 GPUs x 2 images, 160k iterations (DiNAT-Large recipe).
_base_ = ['mmseg::_base_/datasets/ade20k_640x640.py', './adamw_poly_160k.py']

data_root = 'data/ade/ADEChallengeData2016'
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
