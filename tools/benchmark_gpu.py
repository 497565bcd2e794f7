"""GPU benchmark of nat_mm's neighborhood attention against the alternatives.

Methods (all at kernel/window 7, head_dim 32, with a relative position bias unless noted):
  nat_fused      nat_mm.ops.na2d (fused CUDA kernels, rpb)
  nat_fused_tensor_cores  the same with the opt-in tensor-core kernels
                 (NAT_MM_CUDA_TENSOR_CORES=1: forward and backward query side, fp16/bf16)
  nat_unfused    na2d_qk -> softmax -> na2d_av (attention map in memory, rpb)
  sdpa_window    Swin-style window attention: pad to /7, partition into 7x7 windows,
                 F.scaled_dot_product_attention with the [heads, 49, 49] bias, reverse
  sdpa_window_nobias  the same without bias (lets SDPA pick flash attention)
  flex           FlexAttention over the flattened map with a neighborhood block mask and
                 the rpb as score_mod (torch.compile'd)
  reference      nat_mm's pure-PyTorch reference
Shapes: NAT-Tiny classification 224px (batch 64; maps 56, 28, 14, 7; heads 2, 4, 8, 16)
and detection 800x1344 (batch 2; maps 200x336, 100x168, 50x84, 25x42).
Modes fwd and fwd+bwd; dtypes bf16, fp16, fp32 (in that order, until --budget-s runs out).

Reported per (shape, dtype, mode, method): mean ms (CUDA events), achieved TFLOP/s counting
the neighborhood-attention FLOPs (fwd 4*B*h*H*W*49*D; fwd+bwd 3.5x that, the usual
flash-attention count with the recomputation in backward), the peak memory above the
inputs, and ratios nat_fused / other. JSON with --json.

    python tools/benchmark_gpu.py --json bench.json [--budget-s 150] [--quick]
    python tools/benchmark_gpu.py --device cpu --tiny      # smoke test of the harness
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nat_mm.ops import backend_info, na2d, na2d_av, na2d_qk, na2d_reference  # noqa: E402
from benchmark_ops import HEAD_DIM, KERNEL, window_bias  # noqa: E402  (same window, bias)

HEADS = (2, 4, 8, 16)
SHAPES = {
    'cls224': (64, [(56, 56), (28, 28), (14, 14), (7, 7)]),
    'det800x1344': (2, [(200, 336), (100, 168), (50, 84), (25, 42)]),
}
TINY = {'tiny': (2, [(14, 14), (9, 12)])}
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
METHODS = ('nat_fused', 'nat_fused_tensor_cores', 'nat_unfused', 'sdpa_window', 'sdpa_window_nobias', 'flex',
           'reference')


# ---------------------------------------------------------------- methods
def nat_fused(q, k, v, rpb, scale):
    return na2d(q, k, v, KERNEL, 1, rpb=rpb, scale=scale)


nat_fused_tensor_cores = nat_fused  # run under METHOD_ENV's switch

# Environment switches a method runs under (the ops read them at each call, so the switch
# must hold through the backward too).
METHOD_ENV = {'nat_fused_tensor_cores': {'NAT_MM_CUDA_TENSOR_CORES': '1'}}


@contextlib.contextmanager
def method_env(method):
    switches = METHOD_ENV.get(method, {})
    saved = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def nat_unfused(q, k, v, rpb, scale):
    return na2d_av(na2d_qk(q * scale, k, KERNEL, 1, rpb=rpb).softmax(-1), v, KERNEL, 1)


def reference(q, k, v, rpb, scale):
    return na2d_reference(q, k, v, (KERNEL, KERNEL), (1, 1), rpb=rpb, scale=scale)


def _partition(x):
    b, h, height, width, d = x.shape
    ph, pw = (-height) % KERNEL, (-width) % KERNEL
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hh, ww = (height + ph) // KERNEL, (width + pw) // KERNEL
    x = x.reshape(b, h, hh, KERNEL, ww, KERNEL, d).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(b * hh * ww, h, KERNEL * KERNEL, d), (b, h, height, width, d, hh, ww)


def _reverse(x, meta):
    b, h, height, width, d, hh, ww = meta
    x = x.reshape(b, hh, ww, h, KERNEL, KERNEL, d).permute(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(b, h, hh * KERNEL, ww * KERNEL, d)[:, :, :height, :width]


def sdpa_window(q, k, v, rpb, scale):
    (qw, meta), (kw, _), (vw, _) = _partition(q), _partition(k), _partition(v)
    bias = window_bias(rpb).to(q.dtype)[None] if rpb is not None else None
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias, scale=scale)
    return _reverse(out, meta)


def sdpa_window_nobias(q, k, v, rpb, scale):
    return sdpa_window(q, k, v, None, scale)


_flex_cache = {}


def _flex_with_bias(q, k, v, table, block_mask, scale, width):
    """FlexAttention with NA's relative position bias. The bias table is an argument of the
    compiled function, not a tensor captured by a closure: torch 2.11 could not take the
    gradient through a captured one ("all unwrapped values must be FakeTensor")."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, bb, hd, q_idx, kv_idx):
        di = torch.clamp(kv_idx // width - q_idx // width + KERNEL - 1, 0, 2 * KERNEL - 2)
        dj = torch.clamp(kv_idx % width - q_idx % width + KERNEL - 1, 0, 2 * KERNEL - 2)
        return score + table[hd, di, dj]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def make_flex(height, width, device):
    from torch.nn.attention.flex_attention import create_block_mask
    half = KERNEL // 2

    def start(i, length):
        return torch.clamp(i - half, 0, length - KERNEL)

    def mask_mod(b, h, q_idx, kv_idx):
        qi, qj = q_idx // width, q_idx % width
        ki, kj = kv_idx // width, kv_idx % width
        si, sj = start(qi, height), start(qj, width)
        return (ki >= si) & (ki < si + KERNEL) & (kj >= sj) & (kj < sj + KERNEL)

    key = (height, width, str(device))
    if key not in _flex_cache:
        # one compile per (shape, grad mode): lift dynamo's limit of 8, past which it would
        # silently run flex unfused (dense scores: out of memory at the detection shapes)
        import torch._dynamo
        for name in ('recompile_limit', 'cache_size_limit'):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        try:  # compiled mask construction: never materializes the dense [HW, HW] mask
            block_mask = create_block_mask(mask_mod, None, None, height * width,
                                           height * width, device=device, _compile=True)
        except TypeError:
            block_mask = create_block_mask(mask_mod, None, None, height * width,
                                           height * width, device=device)
        _flex_cache[key] = (block_mask, torch.compile(_flex_with_bias, dynamic=False))
    block_mask, compiled = _flex_cache[key]

    def run(q, k, v, rpb, scale):
        b, h, hh, ww, d = q.shape
        flat = lambda t: t.reshape(b, h, hh * ww, d)
        out = compiled(flat(q), flat(k), flat(v), rpb, block_mask, scale, width)
        return out.reshape(b, h, hh, ww, d)

    return run


# ---------------------------------------------------------------- timing
def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_fn(fn, device, min_time=0.05, max_iters=30, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < max_iters and (len(times) < 3 or time.perf_counter() < t_end):
        if device.type == 'cuda':
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return sum(times[: max(1, len(times) * 3 // 4)]) / max(1, len(times) * 3 // 4)  # trim slow tail


def peak_memory_mib(fn, device):
    if device.type != 'cuda':
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def na_flops(batch, heads, height, width):
    return 4.0 * batch * heads * height * width * KERNEL * KERNEL * HEAD_DIM


def compute_ratios(records):
    """nat_fused time / other time for each (task, stage, dtype, mode)."""
    by_key = {}
    for r in records:
        if 'ms' in r:
            key = (r['task'], r['stage'], r['dtype'], r['mode'])
            by_key.setdefault(key, {})[r['method']] = r['ms']
    ratios = []
    for (task, stage, dname, mode), times in sorted(by_key.items()):
        if 'nat_fused' not in times:
            continue
        entry = {'task': task, 'stage': stage, 'dtype': dname, 'mode': mode}
        for other, ms in sorted(times.items()):
            if other != 'nat_fused':
                entry[f'nat_fused/{other}'] = times['nat_fused'] / ms
        ratios.append(entry)
    return ratios


def profile_kernels(device, dtype=torch.bfloat16):
    """Per-kernel device time of one fwd+bwd of nat_fused and sdpa_window (torch.profiler),
    so that a kernel's share of the total is known without a profiler session on the GPU."""
    from torch.profiler import ProfilerActivity, profile
    batch, maps = SHAPES['det800x1344']
    shape = (batch, HEADS[0], *maps[0], HEAD_DIM)
    leaves = [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3)]
    rpb = (0.02 * torch.randn(HEADS[0], 2 * KERNEL - 1, 2 * KERNEL - 1, device=device)
           ).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device, dtype=dtype)
    for name, fn in (('nat_fused', nat_fused), ('nat_fused_tensor_cores', nat_fused_tensor_cores),
                     ('sdpa_window', sdpa_window)):
        def step():
            out = fn(*leaves, rpb, HEAD_DIM ** -0.5)
            torch.autograd.grad(out, (*leaves, rpb), grad)
        with method_env(name):
            for _ in range(3):
                step()
            _sync(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                _sync(device)
        events = prof.key_averages()
        key = next((k for k in ('self_device_time_total', 'self_cuda_time_total')
                    if hasattr(events[0], k)), None) if len(events) else None
        print(f'profile {name} fwd+bwd x5, det stage 1 {shape} {dtype}:')
        if key is None:
            print('  (no device events)')
            continue
        rows = sorted(events, key=lambda e: -getattr(e, key))
        total = sum(getattr(e, key) for e in rows) or 1.0
        for e in rows[:12]:
            t = getattr(e, key)
            print(f'  {t / 5e3:8.3f} ms/iter {100 * t / total:5.1f}%  x{e.count // 5:<3d} '
                  f'{e.key[:90]}')


def markdown_report(summary):
    """Tables (one per dtype) of a benchmark JSON: time, ratio to SDPA window attention,
    TFLOP/s and peak memory of nat_fused, per shape and mode."""
    recs = {(r['task'], r['stage'], r['dtype'], r['mode'], r['method']): r
            for r in summary['records']}
    env = summary['env']
    lines = [f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), kernel "
             f"{env['kernel']}, head_dim {env['head_dim']}, with rpb; ratio = nat_fused time / "
             f"other time (< 1: nat_fused faster); peak = memory above the inputs.", '']
    for dname in DTYPES:
        rows = sorted({k[:2] for k in recs if k[2] == dname})
        if not rows:
            continue
        lines += [f'**{dname}**', '',
                  '| shape | mode | nat_fused ms | TFLOP/s | sdpa_window ms | ratio | '
                  'ratio vs sdpa no bias | ratio vs flex | ratio vs unfused | '
                  'ratio vs tensor cores | peak MiB nat / sdpa |',
                  '|---|---|---|---|---|---|---|---|---|---|---|']
        for task, stage in rows:
            for mode in ('fwd', 'fwd+bwd'):
                get = lambda m: recs.get((task, stage, dname, mode, m), {})
                nat = get('nat_fused')
                if 'ms' not in nat:
                    continue

                def ratio(m):
                    other = get(m)
                    return f"{nat['ms'] / other['ms']:.2f}" if 'ms' in other else '-'
                sd = get('sdpa_window')
                shape = 'x'.join(str(x) for x in nat['shape'])
                lines.append(
                    f"| {task} s{stage} [{shape}] | {mode} | {nat['ms']:.3f} | "
                    f"{nat['tflops']:.2f} | {sd.get('ms', float('nan')):.3f} | "
                    f"{ratio('sdpa_window')} | {ratio('sdpa_window_nobias')} | {ratio('flex')} | "
                    f"{ratio('nat_unfused')} | {ratio('nat_fused_tensor_cores')} | "
                    f"{nat.get('peak_mib') or 0:.0f} / "
                    f"{sd.get('peak_mib') or 0:.0f} |")
        lines.append('')
    return '\n'.join(lines)


def plot_report(summary, path):
    """Bar chart of a benchmark JSON: nat_fused time / SDPA window-attention time per shape,
    forward and forward+backward, one panel per dtype (< 1: nat_fused faster)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ratios = {(r['task'], r['stage'], r['dtype'], r['mode']): r['nat_fused/sdpa_window']
              for r in summary['ratios'] if 'nat_fused/sdpa_window' in r}
    dtypes = [d for d in DTYPES if any(k[2] == d for k in ratios)]
    if not dtypes:
        raise ValueError('no nat_fused/sdpa_window ratios in this JSON')
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.8), sharey=True,
                             squeeze=False)
    for ax, dname in zip(axes[0], dtypes):
        shapes = sorted({k[:2] for k in ratios if k[2] == dname})
        for offset, mode in ((-0.2, 'fwd'), (0.2, 'fwd+bwd')):
            values = [ratios.get((*shape, dname, mode), float('nan')) for shape in shapes]
            ax.bar([i + offset for i in range(len(shapes))], values, width=0.4, label=mode)
        ax.axhline(1.0, color='black', linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f'{task[:3]} s{stage}' for task, stage in shapes], rotation=45)
        ax.set_title(dname)
        ax.grid(True, axis='y', alpha=.3)
    axes[0][0].set_ylabel('nat_fused / SDPA window time')
    axes[0][0].legend()
    env = summary['env']
    fig.suptitle(f"{env['device']}, torch {env['torch']}: NA (k={env['kernel']}) vs Swin "
                 f"window attention (< 1: NA faster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--budget-s', type=float, default=240.0,
                        help='stop starting new configurations after this many seconds')
    parser.add_argument('--dtypes', default='bf16,fp16,fp32')
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--flex-dtypes', default='bf16',
                        help='dtypes for flex (each shape compiles; default bf16 only)')
    parser.add_argument('--reference-dtypes', default='bf16')
    parser.add_argument('--quick', action='store_true', help='fewer timing iterations')
    parser.add_argument('--tiny', action='store_true', help='tiny shapes (harness smoke test)')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--report', metavar='JSON',
                        help='print markdown tables of an earlier run\'s JSON and exit')
    parser.add_argument('--plot', metavar='PNG',
                        help='with --report: also draw the ratios to SDPA window attention')
    parser.add_argument('--profile', action='store_true',
                        help='first print the per-kernel device time of nat_fused and '
                             'sdpa_window fwd+bwd at the detection stage-1 shape (bf16)')
    args = parser.parse_args(argv)

    if args.report:
        with open(args.report) as f:
            summary = json.load(f)
        print(markdown_report(summary))
        if args.plot:
            plot_report(summary, args.plot)
        return 0
    if args.plot:
        parser.error('--plot goes with --report (plot a finished run\'s JSON)')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('benchmark_gpu: no CUDA device', file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    shapes = TINY if args.tiny else SHAPES
    dtypes = [d for d in args.dtypes.split(',') if d]
    methods = [m for m in args.methods.split(',') if m]
    if device.type != 'cuda':
        methods = [m for m in methods if m != 'flex']
    flex_dtypes = set(args.flex_dtypes.split(','))
    ref_dtypes = set(args.reference_dtypes.split(','))
    timing = dict(min_time=0.02, max_iters=10) if args.quick else {}

    env = {'torch': torch.__version__, 'cuda': torch.version.cuda,
           'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
           'backend': {k: v for k, v in backend_info().items() if k != 'extension_error'},
           'kernel': KERNEL, 'head_dim': HEAD_DIM}
    print(f"benchmark_gpu: {env['device']}, torch {env['torch']}, backend {env['backend']}")
    if args.profile and device.type == 'cuda':
        try:
            profile_kernels(device)
        except Exception as error:  # the profile is a diagnostic: never lose the benchmark
            print(f'profile failed: {type(error).__name__}: {error}')
    records = []
    fns = {'nat_fused': nat_fused, 'nat_fused_tensor_cores': nat_fused_tensor_cores,
           'nat_unfused': nat_unfused, 'sdpa_window': sdpa_window,
           'sdpa_window_nobias': sdpa_window_nobias, 'reference': reference}
    # Phases in priority order: the fast methods in every dtype first, then flex (one
    # compile per shape), then the slow reference.
    fast = [m for m in methods if m not in ('flex', 'reference')]
    # the tensor-core kernels serve float16/bfloat16 only: in fp32 both are one kernel
    phases = [(d, [m for m in fast if not (d == 'fp32' and m == 'nat_fused_tensor_cores')])
              for d in dtypes]
    if 'flex' in methods:
        phases += [(d, ['flex']) for d in dtypes if d in flex_dtypes]
    if 'reference' in methods:
        phases += [(d, ['reference']) for d in dtypes if d in ref_dtypes]
    stopped = None

    def dump():
        if args.json:
            summary = {'env': env, 'records': records, 'ratios': compute_ratios(records),
                       'stopped_early': stopped, 'seconds': time.perf_counter() - t_start}
            with open(args.json + '.tmp', 'w') as f:
                json.dump(summary, f, indent=1)
            os.replace(args.json + '.tmp', args.json)

    for dname, phase_methods in phases:
        dtype = DTYPES[dname]
        for task, (batch, maps) in shapes.items():
            for stage, ((height, width), heads) in enumerate(zip(maps, HEADS), start=1):
                if time.perf_counter() - t_start > args.budget_s:
                    stopped = f'budget of {args.budget_s:.0f} s reached'
                    break
                gen = torch.Generator(device='cpu').manual_seed(stage)
                shape = (batch, heads, height, width, HEAD_DIM)
                q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
                rpb = (0.02 * torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1,
                                          generator=gen)).to(device, dtype)
                grad = torch.randn(shape, generator=gen).to(device, dtype)
                scale = HEAD_DIM ** -0.5
                flops = na_flops(batch, heads, height, width)
                for method in phase_methods:
                    for mode in ('fwd', 'fwd+bwd'):
                        if time.perf_counter() - t_start > args.budget_s:
                            stopped = f'budget of {args.budget_s:.0f} s reached'
                            break
                        rec = {'task': task, 'stage': stage, 'shape': list(shape),
                               'dtype': dname, 'mode': mode, 'method': method}
                        try:
                            if method == 'flex':
                                fn = make_flex(height, width, device)
                            else:
                                fn = fns[method]
                            if mode == 'fwd':
                                leaves = (q, k, v, rpb)

                                def call():
                                    with torch.no_grad():
                                        return fn(*leaves, scale)
                            else:
                                leaves = tuple(t.detach().requires_grad_() for t in (q, k, v, rpb))

                                def call():
                                    out = fn(*leaves, scale)
                                    torch.autograd.grad(out, leaves, grad, allow_unused=True)
                            with method_env(method):
                                ms = time_fn(call, device, **timing)
                                rec['peak_mib'] = peak_memory_mib(call, device)
                            rec['ms'] = ms
                            rec['tflops'] = flops * (1 if mode == 'fwd' else 3.5) / (ms * 1e-3) / 1e12
                        except Exception as error:  # OOM, unsupported config, compile failure
                            rec['error'] = f'{type(error).__name__}: {str(error)[:300]}'
                            if device.type == 'cuda':
                                torch.cuda.empty_cache()
                        records.append(rec)
                        dump()
                        status = (f"{rec['ms']:9.3f} ms {rec['tflops']:7.2f} TFLOP/s "
                                  f"peak {rec['peak_mib'] or 0:9.1f} MiB"
                                  if 'ms' in rec else rec['error'][:100])
                        print(f'{task:12s} s{stage} {dname} {mode:8s} {method:19s} {status}',
                              flush=True)
                q = k = v = rpb = grad = None  # free the inputs before the next shape
            if stopped:
                break
        if stopped:
            break
    if stopped:
        print(f'benchmark_gpu: stopped early: {stopped}')

    ratios = compute_ratios(records)
    print('\nratios (nat_fused time / other time; < 1 means nat_fused is faster):')
    for e in ratios:
        cols = ' '.join(f"{k.split('/')[1]}={v:.2f}" for k, v in e.items() if '/' in k)
        print(f"  {e['task']:12s} s{e['stage']} {e['dtype']} {e['mode']:8s} {cols}")
    dump()
    if args.json:
        print(f'benchmark_gpu: wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
