#!/usr/bin/env python
"""Train a NAT / DiNAT detector (mmdet) or segmentor (mmseg) from a config.

The task is taken from the config's ``default_scope`` ('mmdet' or 'mmseg'), so the same
script trains configs/detection/* and configs/segmentation/*. Flags follow mmdet's and
mmseg's tools/train.py.

    python tools/train.py configs/detection/nat_tiny_maskrcnn.py
    python tools/train.py configs/segmentation/nat_mini_upernet.py --work-dir work_dirs/x
    bash tools/dist_train.sh configs/detection/nat_tiny_maskrcnn.py 8 --auto-scale-lr

Without a GPU, AmpOptimWrapper (fp16) falls back to fp32 and distributed runs use gloo.
"""
import argparse

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (adapt_to_cpu, add_cfg_options, add_launcher_args, add_repo_to_pythonpath,
                     build_runner, end_distributed_process, load_config, parse_launcher_args)
from _data_check import require_datasets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Train a NAT/DiNAT detector (mmdet) or segmentor (mmseg).',
        epilog='The task (mmdet or mmseg) is taken from the config\'s default_scope.')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic mixed precision training (needs a GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='detection: scale the lr linearly from the config\'s '
                        'auto_scale_lr.base_batch_size to the actual total batch')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint; without a path, from '
                        'the latest checkpoint in the work dir')
    add_cfg_options(parser, ', e.g. train_cfg.max_epochs=12 '
                    'train_dataloader.batch_size=4 model.backbone.init_cfg=None')
    add_launcher_args(parser)
    return parse_launcher_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    add_repo_to_pythonpath()
    cfg, scope = load_config(args)

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.type
        if optim_wrapper == 'AmpOptimWrapper':
            print('AMP training is already enabled in the config.')
        else:
            assert optim_wrapper == 'OptimWrapper', (
                f'--amp is only supported with OptimWrapper, got {optim_wrapper}')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        auto_scale_lr = cfg.get('auto_scale_lr', None)
        if not auto_scale_lr or 'base_batch_size' not in auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr = dict(enable=..., '
                               'base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True

    adapt_to_cpu(cfg, args.launcher)

    # resume: an explicit checkpoint > the latest one in work_dir
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    # the val loop runs only with all three of its keys, as mmengine's Runner builds it
    validates = all(cfg.get(k) for k in ('val_dataloader', 'val_cfg', 'val_evaluator'))
    require_datasets(cfg, ['train', 'val'] if validates else ['train'], scope)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
    end_distributed_process()
