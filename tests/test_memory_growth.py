"""No memory growth (issue 7): 200 forward + backward steps of a small DiNAT backbone on the
CPU leave the resident set size (RSS) flat after warm-up.

RSS is read from /proc/self/statm (Linux). After 30 warm-up steps (allocator caches,
autograd and OpenMP pools settle) the RSS is sampled every 10 steps; the growth from the
first sample to the largest later one must stay within 3% of the warm RSS (and 24 MiB), and
the least-squares trend over the measured steps must project to under 1% per 100 steps.
A leak of one small tensor per step (~100 KiB) would exceed that.

Marked ``slow`` (minutes on a loaded 2-core machine): ``pytest -m slow`` or
NAT_MM_RUN_SLOW=1.
"""
import gc
import os
import resource
import time

import pytest
import torch

WARMUP, STEPS, EVERY = 30, 200, 10
PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trend_per_step(samples):
    """Least-squares slope of (step, rss) pairs, in bytes per step."""
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    return sum((x - mean_x) * (y - mean_y) for x, y in samples) / var


def run_steps(model, images, weights, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        feats = model(images)
        loss = sum((f * w).mean() for f, w in zip(feats, weights))
        loss.backward()
        optimizer.step()


def measure():
    if not os.path.exists('/proc/self/statm'):
        pytest.skip('needs /proc (Linux) to read the RSS')
    models = pytest.importorskip('nat_mm.models')
    torch.manual_seed(0)
    # DiNAT with one plain and one dilated block in the first level: both code paths
    model = models.DiNAT(arch='mini', depths=(2, 1, 1, 1), kernel_size=7,
                         dilations=[[1, 2], [1], [1], [1]], drop_path_rate=0.1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        weights = [torch.randn_like(f) for f in model(images)]
    start = time.perf_counter()
    run_steps(model, images, weights, optimizer, WARMUP)
    gc.collect()
    samples = [(0, rss_bytes())]
    for done in range(EVERY, STEPS + 1, EVERY):
        run_steps(model, images, weights, optimizer, EVERY)
        gc.collect()
        samples.append((done, rss_bytes()))
    elapsed = time.perf_counter() - start
    return samples, elapsed


@pytest.mark.slow
def test_rss_flat_over_200_steps():
    samples, elapsed = measure()
    warm = samples[0][1]
    growth = max(y for _, y in samples[1:]) - warm
    slope = trend_per_step(samples)
    mib = 2 ** 20
    report = (f'DiNAT-mini (2,1,1,1): {STEPS} steps in {elapsed:.1f}s; RSS warm '
              f'{warm / mib:.1f} MiB, max growth {growth / mib:+.2f} MiB '
              f'({100 * growth / warm:+.2f}%), trend {slope * 100 / mib:+.3f} MiB/100 steps, '
              f'peak RSS {peak_rss_bytes() / mib:.0f} MiB')
    print(report)
    assert growth <= min(0.03 * warm, 24 * mib), report
    assert slope * 100 <= 0.01 * warm, report
