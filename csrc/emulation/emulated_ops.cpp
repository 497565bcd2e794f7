// The CUDA sources of na2d_cuda_ops.cu, compiled for the CPU emulation (cuda_emulation.h).
#include "na2d_cuda_ops.cu"
