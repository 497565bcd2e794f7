// Matrix transpose for the CPU kernels' operand copies ([col][C] rows -> [C][col]).
//
// Why not at::vec::transpose_mxn: its float path copies each 16x16 block through a
// VectorizedN on the stack and branches per row on the block's size; perf put 15-18% of the
// fused forward and backward in it. Here a full 16x16 float block stays in registers
// (unpack + 128-bit lane shuffles) and edge blocks only mask their loads and stores.
// Include after vec_isa.h.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace nat_mm {

#if defined(CPU_CAPABILITY_AVX512)
// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows <= 16, c < cols <= 16.
inline void transpose_block16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                              int rows, int cols) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * ld_src) : _mm512_setzero_ps();
  // Pairs of rows interleaved, then pairs of pairs: each 128-bit lane k of b[4g + j] holds
  // rows 4g..4g+3 of column 4k + j.
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    const __m512d lo0 = _mm512_castps_pd(a[4 * g]), lo1 = _mm512_castps_pd(a[4 * g + 2]);
    const __m512d hi0 = _mm512_castps_pd(a[4 * g + 1]), hi1 = _mm512_castps_pd(a[4 * g + 3]);
    b[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    b[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    b[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    b[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  // A 4x4 transpose of 128-bit lanes per j: column 4k + j = lane k of b[j], b[4+j], ...
  const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
  for (int j = 0; j < 4; ++j) {
    const __m512 u0 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xdd);
    const __m512 u2 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xdd);
    const __m512 column[4] = {
        _mm512_shuffle_f32x4(u0, u2, 0x88), _mm512_shuffle_f32x4(u1, u3, 0x88),
        _mm512_shuffle_f32x4(u0, u2, 0xdd), _mm512_shuffle_f32x4(u1, u3, 0xdd)};
    for (int k = 0; k < 4; ++k) {
      const int c = 4 * k + j;
      if (c < cols) _mm512_mask_storeu_ps(dst + c * ld_dst, row_mask, column[k]);
    }
  }
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols.
template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows,
               int64_t cols) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        transpose_block16(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst,
                          static_cast<int>(std::min<int64_t>(16, rows - r0)),
                          static_cast<int>(std::min<int64_t>(16, cols - c0)));
      }
    }
    return;
  }
#endif
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, static_cast<int>(rows),
                            static_cast<int>(cols));
}

}  // namespace nat_mm
