// The CUDA sources of na2d_cuda_fused_fwd.cu, compiled for the CPU emulation (cuda_emulation.h).
#include "na2d_cuda_fused_fwd.cu"
