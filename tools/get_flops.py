#!/usr/bin/env python
"""Count the FLOPs and parameters of a detector or segmentor config.

Uses mmengine's ``get_model_complexity_info`` (jit-traced op counting). The
neighborhood-attention ops have no built-in FLOP rule; ``nat_mm.flops`` registers
handles for them (B*heads*H*W*k*k*head_dim multiply-adds for each of QK and AV). FLOPs
here are multiply-adds counted once (fvcore / mmengine convention, as in the papers'
tables).

    python tools/get_flops.py configs/detection/nat_tiny_maskrcnn.py             # 800x1280
    python tools/get_flops.py configs/segmentation/nat_tiny_upernet.py --shape 512 2048
"""
import argparse

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (add_cfg_options, add_repo_to_pythonpath, build_model_from_cfg,
                     config_scope, dummy_batch, input_hw, read_config)

DEFAULT_SHAPES = dict(mmdet=(800, 1280), mmseg=(512, 2048))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Count the FLOPs and parameters of a '
                                'NAT/DiNAT detector or segmentor.')
    p.add_argument('config', help='config file')
    p.add_argument('--shape', type=int, nargs='+', default=None,
                   help='input height [width] (default: 800 1280 for detection, the '
                   'size behind Swin/NAT detection tables; 512 2048 for segmentation)')
    p.add_argument('--backbone-only', action='store_true',
                   help='count only the backbone')
    p.add_argument('--show-table', action='store_true',
                   help='print the per-module table')
    add_cfg_options(p)
    return p.parse_args(argv)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def main(argv=None):
    args = parse_args(argv)
    add_repo_to_pythonpath()
    from functools import partial

    import torch
    from mmengine.analysis import get_model_complexity_info

    cfg = read_config(args)
    scope = config_scope(cfg)
    import nat_mm.flops  # noqa: F401  (registers the NA op FLOP handles)
    h, w = input_hw(args.shape, DEFAULT_SHAPES[scope])

    model = build_model_from_cfg(cfg)
    with torch.no_grad():
        if args.backbone_only:
            target = model.backbone
            inputs = (torch.randn(1, 3, h, w), )
        else:
            data = model.data_preprocessor(dummy_batch(scope, h, w), False)
            target = model
            model.forward = partial(model.forward, data_samples=data['data_samples'],
                                    mode='tensor')
            inputs = (data['inputs'], )
            h, w = data['inputs'].shape[-2:]
        info = get_model_complexity_info(target, inputs=inputs,
                                         show_table=args.show_table, show_arch=False)
    if args.show_table:
        print(info['out_table'])
    split = '=' * 40
    print(f'{split}\nConfig: {args.config}\nInput shape: (3, {h}, {w})'
          f'{"  [backbone only]" if args.backbone_only else ""}\n'
          f'Flops: {info["flops"] / 1e9:.1f} G\n'
          f'Params: {count_params(target) / 1e6:.2f} M (backbone '
          f'{count_params(model.backbone) / 1e6:.2f} M)\n{split}')
    return info


if __name__ == '__main__':
    main()
