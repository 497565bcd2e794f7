"""Builds nat_mm and its extension nat_mm._C (C++ CPU kernels; CUDA kernels when possible).

Environment:
  NAT_MM_WITH_CUDA=1|0   force the CUDA kernels on or off (default: on when torch has CUDA
                         and nvcc is found)
  NAT_MM_CPU_ARCH=...    -march value for the CPU kernels (default: native, so at::vec uses
                         the widest vector ISA of the building machine; 'x86-64-v3' = AVX2)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: 8.0;9.0)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import find_packages, setup


def _cuda_wanted(torch_cuda_available: bool) -> bool:
    flag = os.environ.get('NAT_MM_WITH_CUDA', '').strip().lower()
    if flag in ('1', 'true', 'on', 'yes'):
        return True
    if flag in ('0', 'false', 'off', 'no'):
        return False
    return torch_cuda_available


# torch >= 2.10 headers need C++20 (compare versions, not strings: '2.9' > '2.10').
def cxx_standard(torch_version: str) -> str:
    from torch.torch_version import TorchVersion
    return '-std=c++20' if TorchVersion(torch_version) >= '2.10' else '-std=c++17'


NVCC_OPTIMIZATION = ['-O3', '--use_fast_math', '--expt-relaxed-constexpr', '-lineinfo']


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, 'csrc')
    # csrc/*.cpp: the registration and the argument checks every device shares
    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(csrc, '*.cpp')))
    sources += sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(csrc, 'cpu', '*.cpp')))
    arch = os.environ.get('NAT_MM_CPU_ARCH', 'native')
    std = cxx_standard(torch.__version__)
    cxx = ['-O3', std,
           f'-march={arch}', '-fno-math-errno', '-fopenmp']  # at::parallel_for is OpenMP
    include_dirs = [csrc]
    with_cuda = _cuda_wanted(torch.version.cuda is not None and CUDA_HOME is not None)
    if not with_cuda:
        return [CppExtension('nat_mm._C', sources, include_dirs=include_dirs,
                             extra_compile_args={'cxx': cxx}, extra_link_args=['-fopenmp'])]
    os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')
    sources += sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(csrc, 'cuda', '*.cu')))
    nvcc = NVCC_OPTIMIZATION + [std]
    return [CUDAExtension('nat_mm._C', sources, include_dirs=include_dirs,
                          define_macros=[('NAT_MM_WITH_CUDA', None)],
                          extra_compile_args={'cxx': cxx, 'nvcc': nvcc},
                          extra_link_args=['-fopenmp'])]


def main():
    from torch.utils.cpp_extension import BuildExtension
    setup(
        name='nat_mm',
        version=open(os.path.join('nat_mm', 'version.py')).read().split("'")[1],
        description='Neighborhood Attention Transformers (NAT/DiNAT) for OpenMMLab 2.0, '
                    'with C++/CUDA neighborhood-attention operators',
        packages=find_packages(include=['nat_mm', 'nat_mm.*']),
        python_requires='>=3.9',
        install_requires=['torch>=2.4', 'numpy'],
        extras_require={'onnx': ['onnx', 'onnxscript', 'onnxruntime']},
        ext_modules=extensions(),
        cmdclass={'build_ext': BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == '__main__':
    main()
