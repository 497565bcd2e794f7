// Picks the at::vec implementation from the ISA the compiler targets (setup.py builds the
// CPU kernels with -march=native by default). Must be included before any ATen header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define NAT_MM_CPU_ISA "AVX512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define NAT_MM_CPU_ISA "AVX2"
#else
#define CPU_CAPABILITY DEFAULT
#define NAT_MM_CPU_ISA "DEFAULT"
#endif
#endif
