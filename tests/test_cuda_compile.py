"""CUDA compile check (no GPU needed): every csrc/cuda/*.cu must compile with nvcc.

Runs ``tools/cuda_compile_check.sh``, which compiles each CUDA source with ``nvcc -c`` for
sm_80 and sm_90 against the headers of a CUDA build of torch kept in its own virtual
environment (created on first use, ~1 min from the local wheel store, then reused; see the
script's header). Skipped, with that reason, when nvcc is not on PATH or when
NAT_MM_SKIP_CUDA_COMPILE=1. Takes about 3-5 minutes on 2 cores (most of it nvcc).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'cuda_compile_check.sh')

pytestmark = [
    pytest.mark.skipif(shutil.which('nvcc') is None,
                       reason='CUDA compile check: nvcc is not on PATH'),
    pytest.mark.skipif(os.environ.get('NAT_MM_SKIP_CUDA_COMPILE', '') not in ('', '0'),
                       reason='CUDA compile check: NAT_MM_SKIP_CUDA_COMPILE is set'),
]


def _run(env_extra=None, timeout=1200):
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run(['bash', SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    sys.stdout.write(output)  # shown by pytest on failure (and with -s)
    return proc.returncode, output


def test_every_cuda_source_compiles_for_sm80_and_sm90():
    rc, output = _run()
    assert rc == 0, f'CUDA compile check failed:\n{output}'
    sources = sorted(f for f in os.listdir(os.path.join(ROOT, 'csrc', 'cuda'))
                     if f.endswith('.cu'))
    assert sources, 'no CUDA sources'
    for name in sources:
        assert f'OK    {name}' in output, f'{name} not reported as compiled:\n{output}'
    # Its own temporary object directory is removed after a clean run.
    reported = re.search(r'objects in (\S+)', output)
    assert reported, f'no object directory reported:\n{output}'
    assert not os.path.exists(reported.group(1)), f'{reported.group(1)} left behind'


def test_compile_check_names_the_failing_file(tmp_path):
    broken = tmp_path / 'deliberately_broken.cu'
    broken.write_text('__global__ void k() { this is not cuda; }\n')
    rc, output = _run({'NAT_MM_CUDA_SOURCES': str(broken), 'OUT_DIR': str(tmp_path / 'o')},
                      timeout=1200)
    assert rc != 0
    assert 'FAIL  deliberately_broken.cu' in output
    assert 'FAILED: deliberately_broken.cu' in output
