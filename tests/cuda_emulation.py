"""Builds and loads the CUDA emulation library (csrc/emulation/): the sources under
csrc/cuda/ compiled by the host compiler against a CPU emulation of the CUDA runtime, so
that their kernels run on CPU tensors as the ops ``torch.ops.nat_mm_emulated.*``.

Built once per source change with ninja into ``build/cuda_emulation/`` (about 35 s on 2
cores the first time); the AddressSanitizer variant into ``build/cuda_emulation_asan/``.
"""
import functools
import glob
import importlib.util
import os
import shutil
import subprocess
import time

import torch

from nat_mm.ops.library import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, 'csrc')
STALE_LOCK_S = 900  # a build takes about a minute


def unavailable_reason():
    """Why the emulation cannot be built here, or None."""
    if os.name != 'posix':
        return 'the CUDA emulation needs POSIX ucontext'
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        return 'the CUDA emulation build needs ninja'
    if shutil.which(os.environ.get('CXX', 'c++')) is None:
        return 'the CUDA emulation build needs a C++ compiler'
    return None


def _cxx_standard():
    spec = importlib.util.spec_from_file_location('nat_mm_setup', os.path.join(ROOT, 'setup.py'))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # defines functions only; main() is not run
    return setup.cxx_standard(torch.__version__)


def asan_runtime():
    """Path of the compiler's AddressSanitizer runtime (to LD_PRELOAD), or None."""
    cxx = os.environ.get('CXX', 'c++')
    try:
        path = subprocess.run([cxx, '-print-file-name=libasan.so'], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@functools.lru_cache(maxsize=None)
def _define_schemas():
    """nat_mm's op schemas in the emulation's namespace (its kernels register for them)."""
    library = torch.library.Library('nat_mm_emulated', 'FRAGMENT')
    for schema in SCHEMAS.values():
        library.define(schema)
    return library  # kept alive by the cache: the definitions last as long as it does


@functools.lru_cache(maxsize=None)
def emulated_ops(asan=False):
    """``torch.ops.nat_mm_emulated`` after building (if needed) and loading the library;
    with `asan`, built with AddressSanitizer (the process must preload asan_runtime()), so
    that a kernel reading or writing past a tensor aborts with a report. One of the two per
    process: both register the same operators."""
    from torch.utils.cpp_extension import load

    variant = 'cuda_emulation_asan' if asan else 'cuda_emulation'
    build_dir = os.path.join(ROOT, 'build', variant)
    os.makedirs(build_dir, exist_ok=True)
    # torch's build lock: one left by an interrupted build would make load() wait forever
    lock = os.path.join(build_dir, 'lock')
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
        os.remove(lock)
    sources = sorted(glob.glob(os.path.join(CSRC, 'emulation', '*.cpp')))
    sources.append(os.path.join(CSRC, 'na2d_checks.cpp'))
    sanitize = ['-fsanitize=address', '-fno-omit-frame-pointer'] if asan else []
    _define_schemas()
    load(name=f'nat_mm_{variant}', sources=sources, build_directory=build_dir,
         extra_include_paths=[CSRC, os.path.join(CSRC, 'cuda')],
         extra_cflags=['-O1' if asan else '-O2', _cxx_standard(), '-fno-strict-aliasing',
                       '-DNAT_MM_CUDA_EMULATION', '-DNAT_MM_WITH_CUDA'] + sanitize,
         extra_ldflags=sanitize, is_python_module=False, verbose=False)
    return torch.ops.nat_mm_emulated
