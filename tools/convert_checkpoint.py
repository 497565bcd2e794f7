#!/usr/bin/env python
"""Convert an upstream NAT / DiNAT checkpoint (classification, or mmdet 2.x / mmseg 0.x)
into an mm-style checkpoint for nat_mm: tensors under 'backbone.', no classifier head.

The architecture is read off the checkpoint's shapes, the weights are loaded into a
nat_mm NAT backbone and the same load report as ``init_cfg=dict(type='Pretrained')``
is printed. Dilations do not change the weights, so one file serves NAT and DiNAT.

    python tools/convert_checkpoint.py nat_tiny.pth nat_tiny_mm.pth
    python tools/convert_checkpoint.py dinat_s_in1k_224.pth out.pth --kernel-size 11
"""
import argparse
import sys

import torch

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import int_at_least


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an upstream NAT/DiNAT checkpoint to an mm-style nat_mm '
                    'checkpoint (keys under "backbone.") and print the load report.')
    parser.add_argument('src', help='upstream checkpoint (path or http(s) URL)')
    parser.add_argument('dst', help='output .pth file')
    parser.add_argument('--kernel-size', type=int_at_least(3, odd=True), default=None,
                        help='target kernel size; the relative position biases are '
                             'resized bicubically when it differs (default: keep)')
    parser.add_argument('--non-strict', action='store_true',
                        help='skip mismatched / unexpected tensors instead of failing')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='read a checkpoint that holds arbitrary Python objects '
                             '(torch.load weights_only=False). Only for files you trust.')
    return parser.parse_args(argv)


def read(src: str, trust_pickle: bool) -> dict:
    from nat_mm.checkpoint import read_checkpoint
    if not trust_pickle:
        return read_checkpoint(src)
    return torch.load(src, map_location='cpu', weights_only=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nat_mm.checkpoint import (CheckpointLoadError, extract_state_dict, infer_arch,
                                   load_backbone_state_dict, to_backbone_keys,
                                   to_mm_checkpoint)
    from nat_mm.models import NAT

    try:
        state_dict = extract_state_dict(read(args.src, args.trust_pickle))
        arch = infer_arch(to_backbone_keys(state_dict)[0])
        if args.kernel_size is not None:
            arch['kernel_size'] = args.kernel_size
        print(f'architecture read from the checkpoint: {arch}')
        with torch.device('meta'):  # weights come from the checkpoint; skip random init
            model = NAT(**arch)
        model = model.to_empty(device='cpu')
        report = load_backbone_state_dict(model, state_dict, strict=not args.non_strict,
                                          source=args.src, logger=None)  # prints it
    except (CheckpointLoadError, OSError) as error:  # a message, not a traceback
        print(f'{type(error).__name__}: {error}', file=sys.stderr)
        return 1
    meta = dict(converted_from=args.src, arch=arch)
    torch.save(to_mm_checkpoint(model, report, meta), args.dst)
    print(f'saved {len(report.loaded)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
