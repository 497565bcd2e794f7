#!/usr/bin/env python
"""Export a NAT / DiNAT backbone to ONNX (dynamic batch, height and width), with the
neighborhood attention decomposed into standard ONNX ops, and check it with ONNX Runtime.

    python tools/export_onnx.py configs/detection/nat_tiny_maskrcnn.py \\
        --checkpoint work_dirs/nat_tiny_maskrcnn/epoch_36.pth --out nat_tiny.onnx
    python tools/export_onnx.py --arch mini --out nat_mini.onnx --check-size 800 1344

The backbone comes from the config's ``model.backbone`` (or ``--arch``/``--dilations``),
its weights from ``--checkpoint`` (an mm detector/segmentor checkpoint or an upstream one;
random weights without it). Inputs of the ONNX model: ``x`` [batch, 3, height, width],
height and width multiples of 16 in [--min-size, --max-size]; outputs: the feature maps of
``out_indices``. Needs the ``onnx`` and ``onnxscript`` packages (``onnxruntime`` for the
check).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a NAT/DiNAT backbone to ONNX.')
    parser.add_argument('config', nargs='?', help='mm config whose model.backbone to export')
    parser.add_argument('--arch', help='NAT arch instead of a config (mini/tiny/small/base)')
    parser.add_argument('--dilations', help="DiNAT dilation preset with --arch ('coco', 'ade')")
    parser.add_argument('--checkpoint', help='weights (mm or upstream checkpoint)')
    parser.add_argument('--out', default='nat_backbone.onnx', help='output .onnx file')
    parser.add_argument('--min-size', type=int, default=64, help='smallest height/width')
    parser.add_argument('--max-size', type=int, default=2048, help='largest height/width')
    parser.add_argument('--check-size', type=int, nargs=2, default=(224, 320),
                        metavar=('H', 'W'), help='input size of the ONNX Runtime check')
    parser.add_argument('--no-check', action='store_true', help='skip the ONNX Runtime check')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.arch is None):
        parser.error('give either a config or --arch')
    return args


def build_backbone(args) -> torch.nn.Module:
    from nat_mm.models import BACKBONES, DiNAT, NAT
    if args.arch:
        if args.dilations:
            return DiNAT(arch=args.arch, dilations=args.dilations)
        return NAT(arch=args.arch)
    from mmengine.config import Config
    cfg = Config.fromfile(args.config).model.backbone.to_dict()
    cfg.pop('_delete_', None)
    cfg.pop('init_cfg', None)  # weights come from --checkpoint
    return BACKBONES[cfg.pop('type').split('.')[-1]](**cfg)


def check_with_onnxruntime(model, path: str, size) -> float:
    """Largest difference between ONNX Runtime and eager PyTorch over all outputs."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = torch.randn(1, 3, *size)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    return max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))


def main(argv=None) -> int:
    args = parse_args(argv)
    from nat_mm.checkpoint import load_pretrained
    from nat_mm.export import export_onnx
    model = build_backbone(args).eval()
    if args.checkpoint:
        load_pretrained(model, args.checkpoint)
    start = time.time()
    export_onnx(model, args.out, min_size=args.min_size, max_size=args.max_size)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB) in '
          f'{time.time() - start:.0f} s')
    if not args.no_check:
        diff = check_with_onnxruntime(model, args.out, args.check_size)
        print(f'ONNX Runtime vs PyTorch at 1x3x{args.check_size[0]}x{args.check_size[1]}: '
              f'max abs difference {diff:.2e}')
        if not diff < 1e-3:
            print('the ONNX model does not match the PyTorch backbone', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
