#!/usr/bin/env python
"""NAT-Tiny vs Swin-T backbones on CPU, side by side in one run.

Models (random initialisation, drop path 0, all four outputs):
  NAT-Tiny  nat_mm.models.NAT(arch='tiny')
  Swin-T    mmdet.models.backbones.SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2),
            num_heads=(3, 6, 12, 24), window_size=7)

Passes:
  fwd       eval mode, under torch.no_grad()
  fwd+bwd   train mode, loss = sum of the means of all outputs, loss.backward()
            (gradients cleared before each run)

Each case runs --warmup untimed passes per model, then --repeat timed passes with the two
models interleaved (NAT, Swin, Swin, NAT, ...) so that load changes on the machine hit both
alike; the median is reported, with the ratio NAT/Swin (< 1: NAT is faster). Both models
use the same torch thread count and the same input tensor.

    python tools/benchmark_backbone.py                     # 1x3x800x1344 and 8x3x224x224
    python tools/benchmark_backbone.py --threads 2 --json backbone.json
    python tools/benchmark_backbone.py --quick             # 1x3x256x384, 2x3x224x224, repeat 1
    python tools/benchmark_backbone.py --smoke             # tiny inputs, checks that it runs
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

# (name, (batch, channels, height, width)) per size set
SIZE_SETS = {
    'full': [('det', (1, 3, 800, 1344)), ('cls', (8, 3, 224, 224))],
    'quick': [('det', (1, 3, 256, 384)), ('cls', (2, 3, 224, 224))],
    'smoke': [('det', (1, 3, 64, 96)), ('cls', (2, 3, 32, 32))],
}
DEFAULT_REPEAT = dict(full=3, quick=1, smoke=1)
PASSES = ('fwd', 'fwd+bwd')
NAT_NAME, SWIN_NAME = 'NAT-Tiny', 'Swin-T'


def build_models(seed=0):
    from mmdet.models.backbones import SwinTransformer

    from nat_mm.models import NAT
    torch.manual_seed(seed)
    nat = NAT(arch='tiny', drop_path_rate=0., out_indices=(0, 1, 2, 3))
    torch.manual_seed(seed)
    swin = SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                           window_size=7, out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    # note: mmdet's SwinTransformer.train() returns None, so no chaining
    return {NAT_NAME: nat, SWIN_NAME: swin}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def run_once(model, x, pass_):
    """One forward (no grad, eval) or forward+backward (train) pass."""
    if pass_ == 'fwd':
        with torch.no_grad():
            outs = model(x)
        del outs
    else:
        model.zero_grad(set_to_none=True)
        outs = model(x)
        loss = sum(o.mean() for o in outs)
        loss.backward()
        del outs, loss


def time_once(model, x, pass_):
    start = time.perf_counter()
    run_once(model, x, pass_)
    return (time.perf_counter() - start) * 1e3


def benchmark_case(models, shape, pass_, repeat, warmup, seed=0):
    """Median ms per model for one input shape and pass; models timed interleaved."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for model in models.values():
        model.train(pass_ == 'fwd+bwd')
    for model in models.values():
        for _ in range(warmup):
            run_once(model, x, pass_)
    times = {name: [] for name in models}
    names = list(models)
    for i in range(repeat):
        for name in (names if i % 2 == 0 else names[::-1]):
            gc.collect()
            times[name].append(time_once(models[name], x, pass_))
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return times


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f
                       if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    from nat_mm.ops import backend_info
    backend = backend_info()
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                nat_mm_backend=backend)


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def shape_str(shape):
    return 'x'.join(map(str, shape))


def markdown(results, ratios):
    lines = [f'| input | pass | {NAT_NAME} ms | {SWIN_NAME} ms | {NAT_NAME}/{SWIN_NAME} |',
             '|---|---|---|---|---|']
    for r in ratios:
        nat = next(x['ms'] for x in results if x['model'] == NAT_NAME
                   and x['input'] == r['input'] and x['pass'] == r['pass'])
        swin = next(x['ms'] for x in results if x['model'] == SWIN_NAME
                    and x['input'] == r['input'] and x['pass'] == r['pass'])
        lines.append(f"| {r['input']} {shape_str(r['shape'])} | {r['pass']} | {nat:.1f} | "
                     f"{swin:.1f} | {r['ratio']:.2f} |")
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument('--quick', action='store_true',
                       help='smaller inputs (1x3x256x384, 2x3x224x224), repeat 1 by default')
    sizes.add_argument('--smoke', action='store_true',
                       help='tiny inputs (1x3x64x96, 2x3x32x32), repeat 1: only checks '
                       'that everything runs; the times mean little')
    p.add_argument('--repeat', type=int, default=None,
                   help='timed runs per model and case, median reported (default 3; '
                   '1 with --quick/--smoke)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed runs per model and case first (default 1)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch CPU threads for both models (default: torch\'s default)')
    p.add_argument('--passes', nargs='+', choices=PASSES, default=list(PASSES),
                   help='which passes to time (default both)')
    p.add_argument('--json', metavar='PATH', help='also write the results as JSON here')
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error('--repeat must be >= 1')
    if args.warmup < 0:
        p.error('--warmup must be >= 0')
    if args.threads is not None and args.threads < 1:
        p.error('--threads must be >= 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size_set = 'quick' if args.quick else 'smoke' if args.smoke else 'full'
    repeat = args.repeat or DEFAULT_REPEAT[size_set]
    info = machine_info()
    models = build_models()
    params = {name: num_params(m) for name, m in models.items()}
    print(f"CPU: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"{info['threads']} threads, nat_mm backend: {info['nat_mm_backend']}")
    print('params: ' + ', '.join(f'{n} {c / 1e6:.2f} M' for n, c in params.items()))
    print(f'sizes: {size_set}, median of {repeat} timed run(s) after {args.warmup} '
          f'warm-up run(s), models interleaved', flush=True)
    load_start = loadavg()
    if load_start is not None and load_start[0] > (info['cores'] or 1):
        print(f'warning: the machine is busy (1-minute load average {load_start[0]:.1f} on '
              f"{info['cores']} cores): times are unreliable, and with more than one thread "
              f'they can be many times too slow (threads wait on each other)', flush=True)
    t_start = time.perf_counter()
    results, ratios = [], []
    for input_name, shape in SIZE_SETS[size_set]:
        for pass_ in args.passes:
            times = benchmark_case(models, shape, pass_, repeat, args.warmup)
            medians = {}
            for name, ts in times.items():
                medians[name] = statistics.median(ts)
                results.append({'model': name, 'input': input_name, 'shape': list(shape),
                                'pass': pass_, 'ms': medians[name], 'times_ms': ts})
            ratio = medians[NAT_NAME] / medians[SWIN_NAME]
            ratios.append({'input': input_name, 'shape': list(shape), 'pass': pass_,
                           'ratio': ratio})
            print(f'  {input_name} {shape_str(shape):13s} {pass_:8s} '
                  f'{NAT_NAME} {medians[NAT_NAME]:9.1f} ms  {SWIN_NAME} '
                  f'{medians[SWIN_NAME]:9.1f} ms  {NAT_NAME}/{SWIN_NAME} {ratio:.2f}',
                  flush=True)
    elapsed = time.perf_counter() - t_start
    print()
    print(markdown(results, ratios))
    print(f'\nthreads used: {torch.get_num_threads()}; load average at start / end: '
          f'{load_start} / {loadavg()}; benchmark took {elapsed:.1f} s; '
          f'peak RSS of the process {peak_rss_mb():.0f} MB')
    if args.json:
        out = dict(machine=info, threads=torch.get_num_threads(), size_set=size_set,
                   repeat=repeat, warmup=args.warmup, params=params, results=results,
                   ratios_nat_over_swin=ratios, loadavg_start=load_start,
                   loadavg_end=loadavg(), elapsed_s=elapsed, peak_rss_mb=peak_rss_mb())
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
