"""Smoke tests for the benchmark scripts in tools/: they run and write sane JSON.

The timings themselves are not checked (the machine may be busy). The backbone benchmark
runs with one thread: on an oversubscribed machine two OpenMP threads can make even tiny
inputs take many seconds, and this is a test of the script, not of the machine.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from tool_modules import import_tool

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BACKBONE = osp.join(REPO, 'tools', 'benchmark_backbone.py')
OPS = osp.join(REPO, 'tools', 'benchmark_ops.py')
MODELS = {'NAT-Tiny', 'Swin-T'}
PASSES = {'fwd', 'fwd+bwd'}


def run(args, timeout):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f'{args} exited {result.returncode}\nstdout:\n{result.stdout}\n'
        f'stderr:\n{result.stderr}')
    return result


def check_backbone_json(path, size_set):
    with open(path) as f:
        data = json.load(f)
    assert data['size_set'] == size_set
    assert data['threads'] == 1 and data['repeat'] == 1
    assert set(data['params']) == MODELS
    assert all(n > 20e6 for n in data['params'].values())  # both ~27-28 M
    results = data['results']
    assert {r['model'] for r in results} == MODELS
    assert {r['pass'] for r in results} == PASSES
    assert len({r['input'] for r in results}) == 2
    assert len(results) == 2 * 2 * 2  # models x passes x inputs
    for r in results:
        assert r['ms'] > 0 and len(r['times_ms']) == 1
        assert all(t > 0 for t in r['times_ms'])
    assert len(data['ratios_nat_over_swin']) == 4
    assert all(r['ratio'] > 0 for r in data['ratios_nat_over_swin'])


def test_benchmark_ops_help():
    result = run([OPS, '--help'], timeout=120)
    assert 'usage' in result.stdout


def test_benchmark_backbone_help():
    result = run([BACKBONE, '--help'], timeout=120)
    for option in ('--threads', '--repeat', '--json', '--quick', '--smoke'):
        assert option in result.stdout


def test_benchmark_backbone_smoke(tmp_path):
    """Tiny inputs (1x3x64x96, 2x3x32x32): ~20 s, most of it importing mmdet."""
    pytest.importorskip('mmdet', reason='the backbone benchmark compares with mmdet\'s Swin')
    out = tmp_path / 'backbone.json'
    result = run([BACKBONE, '--smoke', '--repeat', '1', '--threads', '1', '--json',
                  str(out)], timeout=300)
    assert 'NAT-Tiny/Swin-T' in result.stdout
    check_backbone_json(out, 'smoke')


@pytest.mark.slow
def test_benchmark_backbone_quick(tmp_path):
    """The --quick sizes (1x3x256x384, 2x3x224x224): ~35 s on an idle 2-core machine."""
    pytest.importorskip('mmdet', reason='the backbone benchmark compares with mmdet\'s Swin')
    out = tmp_path / 'backbone.json'
    run([BACKBONE, '--quick', '--repeat', '1', '--threads', '1', '--json', str(out)],
        timeout=600)
    check_backbone_json(out, 'quick')


GPU_BENCH = osp.join(REPO, 'tools', 'benchmark_gpu.py')


def test_benchmark_gpu_harness_on_cpu(tmp_path):
    """The GPU benchmark's harness on the CPU (--tiny): every method and mode is timed,
    the JSON has the ratios, and --report turns it into the markdown tables."""
    out = tmp_path / 'gpu.json'
    run([GPU_BENCH, '--device', 'cpu', '--tiny', '--quick', '--dtypes', 'bf16,fp32',
         '--methods', 'nat_fused,nat_fused_tensor_cores,sdpa_window', '--json', str(out)],
        timeout=600)
    data = json.loads(out.read_text())
    timed = {(r['method'], r['dtype'], r['mode']) for r in data['records'] if 'ms' in r}
    for mode in ('fwd', 'fwd+bwd'):
        assert ('nat_fused', 'fp32', mode) in timed and ('sdpa_window', 'bf16', mode) in timed
        assert ('nat_fused_tensor_cores', 'bf16', mode) in timed
        assert ('nat_fused_tensor_cores', 'fp32', mode) not in timed  # same kernel as nat_fused
    assert data['ratios'] and not data['stopped_early']
    png = tmp_path / 'ratios.png'
    report = run([GPU_BENCH, '--report', str(out), '--plot', str(png)], timeout=120).stdout
    assert '| shape | mode | nat_fused ms |' in report and 'ratio vs tensor cores' in report
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_benchmark_gpu_method_env_is_restored(monkeypatch):
    """A method's kernel switch holds inside method_env (through the backward) and is
    restored after it, also when the call raises."""
    benchmark_gpu = import_tool('benchmark_gpu')
    monkeypatch.delenv('NAT_MM_CUDA_TENSOR_CORES', raising=False)
    with benchmark_gpu.method_env('nat_fused_tensor_cores'):
        assert os.environ['NAT_MM_CUDA_TENSOR_CORES'] == '1'
    assert 'NAT_MM_CUDA_TENSOR_CORES' not in os.environ
    monkeypatch.setenv('NAT_MM_CUDA_TENSOR_CORES', '0')
    with pytest.raises(ZeroDivisionError):
        with benchmark_gpu.method_env('nat_fused_tensor_cores'):
            1 / 0
    assert os.environ['NAT_MM_CUDA_TENSOR_CORES'] == '0'
    with benchmark_gpu.method_env('sdpa_window'):
        assert os.environ['NAT_MM_CUDA_TENSOR_CORES'] == '0'
