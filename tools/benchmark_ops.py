"""Neighborhood attention vs Swin-style window attention (SDPA) on CPU, side by side.

Times (median of --repeat runs after a warm-up, the methods interleaved run by run) of
forward and forward+backward for:
  nat_mm     fused na2d (the op the model uses), C++ kernel, with rpb
  unfused    na2d_qk + softmax + na2d_av, C++ kernels, with rpb
  reference  the pure-PyTorch gather reference (nat_mm.ops.reference)
  swin_sdpa  window attention over non-overlapping 7x7 windows through
             torch.nn.functional.scaled_dot_product_attention, with a relative position bias
             as attn_mask (what Swin computes); the map is padded to a multiple of 7 first
  nat_mm_lse (opt-in: --methods nat_mm nat_mm_lse swin_sdpa; ratios need swin_sdpa) the
             op torch.ops.nat_mm.na2d_fused called directly, its lse output differentiated
             too (out + lse), which the fused backward takes
plus the peak extra memory of each (a fresh subprocess per case, ru_maxrss). Ratios are to
swin_sdpa of the same shape and pass, measured in this run.

    python tools/benchmark_ops.py                     # the four NAT-Tiny shapes, markdown
    python tools/benchmark_ops.py --json out.json --plot docs/na_vs_window.png
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from nat_mm.ops import backend_info, na2d, na2d_av, na2d_qk, na2d_reference  # noqa: E402
from nat_mm.ops.library import op  # noqa: E402

KERNEL = 7
HEAD_DIM = 32
# (name, batch, heads, H, W): NAT-Tiny detection stages 1 and 3, classification stages 1
# and 3 (the 14x14 maps of stage 3, 18 of NAT-Tiny's 30 layers, have no interior runs)
SHAPES = [('det stage 1', 1, 2, 200, 336), ('det stage 3', 1, 8, 50, 84),
          ('cls stage 1', 8, 2, 56, 56), ('cls stage 3', 8, 8, 14, 14)]
METHODS = ['nat_mm', 'unfused', 'reference', 'swin_sdpa']
OPT_IN_METHODS = ['nat_mm_lse']


def make_inputs(method, batch, heads, height, width, seed=0):
    torch.manual_seed(seed)
    if method == 'swin_sdpa':  # Swin pads the map to whole windows
        height, width = -(-height // KERNEL) * KERNEL, -(-width // KERNEL) * KERNEL
    shape = (batch, heads, height, width, HEAD_DIM)
    tensors = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    rpb = torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, requires_grad=True) * 0.02
    return tensors + [rpb.detach().requires_grad_()]


def window_bias(rpb):
    """Swin's bias for one window: rpb[:, ki - qi + k - 1, kj - qj + k - 1]."""
    idx = torch.arange(KERNEL)
    rows = (idx.view(-1, 1) - idx.view(1, -1)).repeat_interleave(KERNEL, 0).repeat_interleave(KERNEL, 1)
    cols = (idx.view(-1, 1) - idx.view(1, -1)).repeat(KERNEL, KERNEL)
    return rpb[:, rows.T + KERNEL - 1, cols.T + KERNEL - 1]  # [heads, 49, 49]


def swin_sdpa(q, k, v, rpb):
    b, h, height, width, d = q.shape
    nh, nw = height // KERNEL, width // KERNEL

    def windows(x):
        x = x.view(b, h, nh, KERNEL, nw, KERNEL, d).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, h, nh * nw, KERNEL * KERNEL, d)

    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v),
                                         attn_mask=window_bias(rpb)[:, None])
    out = out.view(b, h, nh, nw, KERNEL, KERNEL, d).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b, h, height, width, d)


def forward_fn(method):
    if method == 'nat_mm':
        return lambda q, k, v, rpb: na2d(q, k, v, KERNEL, 1, rpb=rpb)
    if method == 'unfused':
        return lambda q, k, v, rpb: na2d_av(
            na2d_qk(q * HEAD_DIM ** -0.5, k, KERNEL, 1, rpb=rpb).softmax(-1), v, KERNEL, 1)
    if method == 'reference':
        return lambda q, k, v, rpb: na2d_reference(q, k, v, (KERNEL, KERNEL), (1, 1), rpb=rpb)
    if method == 'nat_mm_lse':
        def out_plus_lse(q, k, v, rpb):
            out, lse = op('na2d_fused')(q, k, v, rpb, [KERNEL] * 2, [1, 1], HEAD_DIM ** -0.5)
            return out + lse[..., None]
        return out_plus_lse
    return swin_sdpa


def run_once(method, inputs, backward):
    fn = forward_fn(method)
    if backward:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(*inputs)


def peak_memory_mb(method, shape, backward):
    """Extra peak RSS of one call, measured in a fresh interpreter."""
    cmd = [sys.executable, __file__, '--_memory', method, *map(str, shape), str(int(backward))]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def _memory_child(method, batch, heads, height, width, backward):
    """Peak RSS above the RSS before the call, sampled every 0.5 ms by a thread (ru_maxrss
    cannot be reset, and the imports' transient peak would hide the op's)."""
    import threading
    inputs = make_inputs(method, batch, heads, height, width)
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_once(method, inputs, backward)
    done.set()
    sampler.join()
    print(max(peak[0], _rss_mb()) - before)


def gflops(batch, heads, height, width, ms):
    """QK and AV: 2 multiply-adds per (query, neighbor, channel) -> 4 flops."""
    return 4 * batch * heads * height * width * KERNEL * KERNEL * HEAD_DIM / ms / 1e6


def interleaved_ms(methods, inputs, backward, repeat):
    """Median ms per method, the methods timed in turn within each repetition (A, B, A, B,
    ...) so that load changes on a shared machine hit all of them alike. The reference
    (seconds and up to GBs per call) is timed once, after the others: run among them, its
    allocations slowed the calls timed next (the kernel reclaiming and compacting memory)
    by up to 1.5x."""
    fast = [m for m in methods if m != 'reference']
    times = {m: [] for m in fast}
    for m in fast:
        run_once(m, inputs[m], backward)  # warm-up
    for _ in range(repeat):
        for m in fast:
            times[m].append(_time_ms(lambda: run_once(m, inputs[m], backward)))
    result = {m: statistics.median(t) for m, t in times.items()}
    if 'reference' in methods:
        result['reference'] = _time_ms(lambda: run_once('reference', inputs['reference'],
                                                        backward))
    return result


def benchmark(shapes, methods, repeat, memory):
    rows = []
    for name, *shape in shapes:
        inputs = {m: make_inputs(m, *shape) for m in methods}
        for backward in (False, True):
            times = interleaved_ms(methods, inputs, backward, repeat)
            for method in methods:
                ms = times[method]
                row = dict(shape=name, size='x'.join(map(str, shape)), method=method,
                           pass_='fwd+bwd' if backward else 'fwd', ms=ms,
                           gflops=gflops(*shape, ms) * (3 if backward else 1))  # bwd: 4 matmuls
                if memory:
                    row['peak_mb'] = peak_memory_mb(method, shape, backward)
                rows.append(row)
                print(f"  {name:12s} {row['pass_']:8s} {method:10s} {ms:9.1f} ms", flush=True)
    for row in rows:
        base = next(r['ms'] for r in rows if r['shape'] == row['shape']
                    and r['pass_'] == row['pass_'] and r['method'] == 'swin_sdpa')
        row['ratio_to_sdpa'] = row['ms'] / base
    return rows


def markdown(rows, memory):
    head = '| shape (B x heads x H x W) | pass | method | ms | ratio to SDPA | GFLOP/s |'
    sep = '|---|---|---|---|---|---|'
    if memory:
        head, sep = head + ' peak extra MB |', sep + '---|'
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['shape']} ({r['size']}) | {r['pass_']} | {r['method']} | {r['ms']:.1f} | "
                f"{r['ratio_to_sdpa']:.2f} | {r['gflops']:.1f} |")
        if memory:
            line += f" {r['peak_mb']:.0f} |"
        lines.append(line)
    return '\n'.join(lines)


def plot(path, repeat):
    """Forward+backward time vs map size (2 heads, batch 1) for NA and window attention."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sides = [28, 56, 84, 112, 168, 224]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ('nat_mm', 'swin_sdpa'):
        for backward, style in ((False, '--'), (True, '-')):
            ms = [interleaved_ms([method], {method: make_inputs(method, 1, 2, s, s)},
                                 backward, repeat)[method] for s in sides]
            ax.plot([s * s for s in sides], ms, style, marker='o',
                    label=f"{method} {'fwd+bwd' if backward else 'fwd'}")
    ax.set_xlabel('map size H*W (square maps, 2 heads, head dim 32, k=7)')
    ax.set_ylabel('ms (median)')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.grid(True, which='both', alpha=.3)
    ax.legend()
    ax.set_title(f'CPU, {torch.get_num_threads()} threads')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gemm_ceiling_gflops(size=2048, repeat=5):
    """fp32 matrix-multiply throughput of this machine at the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    ms = statistics.median(_time_ms(lambda: a @ b) for _ in range(repeat))
    return 2 * size ** 3 / ms / 1e6


def _time_ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, backend=backend_info())


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeat', type=int, default=5, help='timed runs per case')
    parser.add_argument('--threads', type=int, default=None, help='torch threads')
    parser.add_argument('--methods', nargs='+', default=METHODS,
                        choices=METHODS + OPT_IN_METHODS)
    parser.add_argument('--no-memory', action='store_true', help='skip peak-memory runs')
    parser.add_argument('--json', help='write the results as JSON here')
    parser.add_argument('--plot', help='write a PNG of time vs map size here')
    parser.add_argument('--_memory', nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        method, *shape, backward = args._memory
        return _memory_child(method, *map(int, shape), bool(int(backward)))
    info = machine()
    print(f"CPU: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"{info['threads']} threads, nat_mm backend {info['backend']}")
    info['gemm_gflops'] = gemm_ceiling_gflops()
    print(f"fp32 GEMM ceiling (2048^3 matmul): {info['gemm_gflops']:.0f} GFLOP/s")
    rows = benchmark(SHAPES, args.methods, args.repeat, not args.no_memory)
    print(markdown(rows, not args.no_memory))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=info, results=rows), f, indent=1)
    if args.plot:
        plot(args.plot, args.repeat)


if __name__ == '__main__':
    main()
