#!/usr/bin/env python
"""Measure the inference speed of a detector or segmentor (images per second).

Times ``model.test_step`` (preprocessing, forward and post-processing) on random images
of a fixed size, after warm-up iterations; reports the neighborhood-attention backend
in use (compiled C++/CUDA kernels or the PyTorch fallback).

    python tools/benchmark_inference.py configs/detection/nat_mini_maskrcnn.py
    python tools/benchmark_inference.py CONFIG --checkpoint ckpt.pth --shape 512 512 \
        --num-iters 20 --device cuda
"""
import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import (add_cfg_options, add_repo_to_pythonpath, build_model_from_cfg,
                     config_scope, dummy_batch, input_hw, int_at_least, read_config)

DEFAULT_SHAPES = dict(mmdet=(800, 1333), mmseg=(512, 512))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Benchmark the inference speed of a '
                                'NAT/DiNAT detector or segmentor.')
    p.add_argument('config', help='config file')
    p.add_argument('--checkpoint', default=None,
                   help='checkpoint (optional: speed does not depend on the weights)')
    p.add_argument('--shape', type=int, nargs='+', default=None,
                   help='input height [width] (default: 800 1333 detection, 512 512 '
                   'segmentation)')
    p.add_argument('--batch-size', type=int_at_least(1), default=1, help='images per forward')
    p.add_argument('--num-iters', type=int_at_least(1), default=10, help='timed iterations')
    p.add_argument('--num-warmup', type=int_at_least(0), default=2, help='untimed iterations first')
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:0, ...')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    add_cfg_options(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    add_repo_to_pythonpath()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = read_config(args)
    scope = config_scope(cfg)
    h, w = input_hw(args.shape, DEFAULT_SHAPES[scope])
    model = build_model_from_cfg(cfg, args.checkpoint, device=args.device)
    data = dummy_batch(scope, h, w, args.batch_size)
    cuda = str(args.device).startswith('cuda')

    def step():
        with torch.no_grad():
            model.test_step(data)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.num_warmup):
        step()
    times = []
    for _ in range(args.num_iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    mean = sum(times) / len(times)
    median = times[len(times) // 2]
    from nat_mm.ops import backend_info
    backend = backend_info()
    print(f'config: {args.config}\ndevice: {args.device}, threads: '
          f'{torch.get_num_threads()}, NA backend: {backend}\n'
          f'input: {args.batch_size} x 3 x {h} x {w}, {args.num_iters} iterations after '
          f'{args.num_warmup} warm-up\n'
          f'time per batch: mean {mean * 1e3:.1f} ms, median {median * 1e3:.1f} ms\n'
          f'throughput: {args.batch_size / mean:.2f} images/s')
    return dict(mean_s=mean, median_s=median, fps=args.batch_size / mean)


if __name__ == '__main__':
    main()
