# 160k-iteration schedule of the NAT / DiNAT UperNet recipe: AdamW lr 6e-5, weight decay
# 0.01 (none on rpb / norm), linear warmup over 1500 iterations (ratio 1e-6), then poly
# (power 1.0) decay to 0; fp16 mixed precision. Schedule and runtime only.
_base_ = [
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]

custom_imports = dict(imports=['nat_mm'], allow_failed_imports=False)

# AmpOptimWrapper needs a GPU; pass `--cfg-options optim_wrapper.type=OptimWrapper` to
# train in fp32.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-05, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'rpb': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)

# Save and restore the random-generator states in checkpoints, so that --resume continues
# the run exactly (mmengine re-seeds on resume; see docs/reliability.md).
custom_hooks = [dict(type='RNGStateHook')]
