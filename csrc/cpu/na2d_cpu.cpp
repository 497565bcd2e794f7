// CPU kernels of 2D neighborhood attention (float, double; half/bfloat16 via float).
//
// Layout: every map is heads-first [B, heads, H, W, C]; inputs are read with any strides
// but contiguous channels (MapView), outputs are contiguous; a "plane" is one
// (batch, head) pair. Work is split over (plane, query row) with at::parallel_for.
//
// Three access patterns build every op:
//  * window scores  s[q, n] = a[q] . b[key(q, n)]  (QK, and grad_attn of AV). Vectorized
//    over the neighbors of one window row: b is first copied to a [row][channel][column]
//    layout with the columns of each dilation residue class side by side, so a window row
//    is a contiguous run and one FMA updates up to a vector's width of neighbors.
//  * weighted sum   o[q] = sum_n w[q, n] b[key(q, n)]  (AV, and grad_query). Vectorized
//    over channels, several independent accumulators to hide FMA latency.
//  * inverse sum    o[k] = sum_(q, n): key(q, n) = k  w[q, n] a[q]  (grad_key, grad_value).
//    A gather over the queries that see key k (axis_inverse), so no two tasks write the
//    same output: deterministic without atomics.
// The rpb gradient is reduced per (plane, row) into fp32/fp64 partial sums, then summed in
// a fixed order: bit-identical for any thread count.
#include "vec_isa.h"  // must precede the ATen headers

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "na2d_checks.h"
#include "na2d_index.h"
#include "na2d_kernels.h"
#include "scratch_pool.h"
#include "transpose.h"

namespace nat_mm {

const char* cpu_capability() { return NAT_MM_CPU_ISA; }

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// ------------------------------------------------------------------ shapes
struct Geometry {
  int64_t batch, heads, planes, H, W, D, kh, kw, dh, dw;

  Geometry(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
    batch = x.size(0);
    heads = x.size(1);
    planes = batch * heads;
    H = x.size(2);
    W = x.size(3);
    D = x.size(4);
    kh = kernel_size[0];
    kw = kernel_size[1];
    dh = dilation[0];
    dw = dilation[1];
  }
  int64_t window() const { return kh * kw; }
  int64_t bias_bins() const { return (2 * kh - 1) * (2 * kw - 1); }
  // Rows per parallel chunk: small maps run on one thread rather than paying a fork/join
  // per op (ATen's convention: about at::internal::GRAIN_SIZE multiply-adds per chunk).
  int64_t row_grain() const {
    return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, W * window() * D));
  }
};

std::vector<int64_t> attn_sizes(const Geometry& g) {
  return {g.batch, g.heads, g.H, g.W, g.window()};
}

// Kernels compute in float (double for double input); half/bfloat16 are converted once.
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x itself when it is in the compute type and its layout is readable as is, else a
// contiguous scratch copy in the compute type.
at::Tensor in_compute_type(const at::Tensor& x, bool layout_readable) {
  const at::ScalarType type = compute_type(x);
  if (x.scalar_type() == type && layout_readable) return x;
  return scratch_empty(x.sizes(), x.options().dtype(type)).copy_(x);
}

// Read through raw pointers: contiguous.
at::Tensor as_compute(const at::Tensor& x) { return in_compute_type(x, x.is_contiguous()); }

// A map read through MapView: contiguous channels, any other strides.
at::Tensor as_compute_map(const at::Tensor& x) {
  return in_compute_type(x, x.size(4) <= 1 || x.stride(4) == 1);
}

// An input map [B, heads, H, W, C] as the kernels read it: channels contiguous, any batch,
// head, row and column strides (NAT's q/k/v are views of its qkv projection's output
// [B, H, W, 3, heads, D] and are read in place, not copied). A plane is a (batch, head) pair.
template <typename T>
struct MapView {
  const T* data;
  int64_t heads, batch_stride, head_stride, row_stride, pixel;

  explicit MapView(const at::Tensor& x)
      : data(x.data_ptr<T>()), heads(x.size(1)), batch_stride(x.stride(0)),
        head_stride(x.stride(1)), row_stride(x.stride(2)), pixel(x.stride(3)) {}
  const T* row(int64_t plane, int64_t r) const {
    return data + plane / heads * batch_stride + plane % heads * head_stride + r * row_stride;
  }
  const T* at(int64_t plane, int64_t r, int64_t column) const {
    return row(plane, r) + column * pixel;
  }
};

// Window start (sub-grid units) of every index of one axis.
std::vector<int64_t> window_starts(int64_t length, int64_t kernel, int64_t dilation) {
  std::vector<int64_t> starts(length);
  for (int64_t i = 0; i < length; ++i) starts[i] = axis_window(i, length, kernel, dilation).start;
  return starts;
}

// Columns reordered so that each dilation residue class is contiguous: a window row of
// any query is then positions [base, base + kw).
struct ColumnOrder {
  std::vector<int64_t> offset;  // first position of each residue class
  int64_t dilation;

  ColumnOrder(int64_t width, int64_t dilation_) : offset(dilation_), dilation(dilation_) {
    int64_t pos = 0;
    for (int64_t r = 0; r < dilation; ++r) {
      offset[r] = pos;
      pos += subgrid_length(width, dilation, r);
    }
  }
  int64_t position(int64_t column) const {
    return offset[column % dilation] + column / dilation;
  }
  int64_t window_base(const AxisWindow& w) const { return offset[w.residue] + w.start; }
};

// ------------------------------------------------------------------ window scores
// Rows row_of(r) ([W][X], leading dimension ld_src) for r < rows, each transposed to
// [X][W], into one tensor with `slack` zeroed elements at the end. Register-block transposes
// (ATen's strided copy_ of the transposed view took ~12% of the fused backward).
template <typename T, typename RowOf>
at::Tensor transposed_rows(RowOf&& row_of, int64_t ld_src, int64_t rows, int64_t W, int64_t X,
                           const at::TensorOptions& options, int64_t slack = 0) {
  const int64_t size = rows * X * W;
  at::Tensor out = scratch_empty({size + slack}, options);
  if (slack > 0) out.narrow(0, size, slack).zero_();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * X)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) transpose(row_of(r), ld_src, dst + r * X * W, W, W, X);
  });
  return out;
}

// x [plane][row][col][C] -> [plane][row][C][col], plus one vector of zeroed slack so that
// full-width loads at the very end stay in bounds (read by key runs without a band kernel).
template <typename T>
at::Tensor channels_by_column(const MapView<T>& x, const Geometry& g,
                              const at::TensorOptions& options) {
  return transposed_rows<T>([&](int64_t r) { return x.row(r / g.H, r % g.H); }, x.pixel,
                            g.planes * g.H, g.W, g.D, options, Vec<T>::size());
}

// Calls f(std::integral_constant<int, N>{}) with N = n, for 1 <= n <= Max: a runtime count
// to a kernel unrolled at compile time.
template <int Max, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, std::forward<F>(f));
  }
  f(std::integral_constant<int, Max>{});
}

// Q queries x N accumulators (window row, column chunk):
// acc[q][i] += a[q * a_stride + ch] * b_i[ch]. Queries with the same window share every key
// load.
template <int Q, int N, typename T>
inline void dot_group(const T* a, int64_t a_stride, const T* const* rows,
                      int64_t channel_stride, int64_t D, T* const* out, int64_t out_stride) {
  Vec<T> acc[Q][N];
  for (int q = 0; q < Q; ++q)
    for (int i = 0; i < N; ++i) acc[q][i] = Vec<T>(T(0));
  // Row offsets from one base, so the loop keeps one pointer and N offsets in registers
  // (N pointers advanced separately were spilled to the stack).
  const T* base = rows[0];
  int64_t off[N];
  for (int i = 0; i < N; ++i) off[i] = rows[i] - base;
  for (int64_t ch = 0; ch < D; ++ch, base += channel_stride) {
    Vec<T> av[Q];
    for (int q = 0; q < Q; ++q) av[q] = Vec<T>(a[q * a_stride + ch]);
    for (int i = 0; i < N; ++i) {
      const Vec<T> bv = Vec<T>::loadu(base + off[i]);
      for (int q = 0; q < Q; ++q) acc[q][i] = at::vec::fmadd(av[q], bv, acc[q][i]);
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int i = 0; i < N; ++i) acc[q][i].store(out[i] + q * out_stride);
}

// Queries one window serves at once (window_scores): their accumulators and one key vector
// per window row stay within the 32 vector registers.
constexpr int64_t kWindowQueries = 4;

// scores[q * stride + m * kw + n] = a[q] . b[key row m, neighbor n] for Q <= kWindowQueries
// consecutive queries a[q] = a + q * a_stride that share one window, cw; b_rows[m]: window row m,
// transposed ([C][position], see RowCopies) in `order`. Each query's scores need window() +
// vector-width entries: chunk stores spill past a row's end and are overwritten by the next
// row (stores go in increasing order).
template <typename T>
void window_scores(const T* a, int64_t a_stride, int64_t queries, const T* const* b_rows,
                   const AxisWindow& cw, const ColumnOrder& order, const Geometry& g, T* scores,
                   int64_t stride) {
  constexpr int64_t L = Vec<T>::size();
  const int64_t column_base = order.window_base(cw);
  const int64_t chunks = (g.kw + L - 1) / L;
  const int64_t total = g.kh * chunks;
  with_count<kWindowQueries>(queries, [&](auto q_count) {
    constexpr int Q = decltype(q_count)::value;
    constexpr int kGroup = Q <= 2 ? 8 : 24 / Q;
    const T* rows[kGroup];
    T* out[kGroup];
    for (int64_t first = 0; first < total; first += kGroup) {
      const int64_t n = std::min<int64_t>(kGroup, total - first);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t m = (first + i) / chunks, c = (first + i) % chunks;
        rows[i] = b_rows[m] + column_base + c * L;
        out[i] = scores + m * g.kw + c * L;
      }
      with_count<kGroup>(n, [&](auto n_count) {
        dot_group<Q, decltype(n_count)::value>(a, a_stride, rows, g.W, g.D, out, stride);
      });
    }
  });
}

// scores[m * kw + n] += rpb[head, bias row of m, bias column of n].
template <typename T>
void add_bias(T* scores, const T* rpb_head, const AxisWindow& rw, const AxisWindow& cw,
              const Geometry& g) {
  const int64_t bias_width = 2 * g.kw - 1;
  for (int64_t m = 0; m < g.kh; ++m) {
    const T* bias = rpb_head + rw.bias(m, g.kh) * bias_width + cw.bias(0, g.kw);
    T* s = scores + m * g.kw;
    for (int64_t n = 0; n < g.kw; ++n) s[n] += bias[n];
  }
}

// ------------------------------------------------------------------ weighted sums
// out[d0 : d0 + C*L] = sum_t w[t * ws] * src[t][d0 : ...], with G independent partial sums.
template <int C, typename T>
inline void weighted_sum_block(const T* w, int64_t ws, const T* const* src, int64_t terms,
                               int64_t d0, T* out) {
  constexpr int64_t L = Vec<T>::size();
  constexpr int G = C >= 3 ? 2 : 8 / C;
  Vec<T> acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = Vec<T>(T(0));
  int64_t t = 0;
  for (; t + G <= terms; t += G) {
    for (int g = 0; g < G; ++g) {
      const Vec<T> wt(w[(t + g) * ws]);
      const T* s = src[t + g] + d0;
      for (int c = 0; c < C; ++c) acc[g][c] = at::vec::fmadd(wt, Vec<T>::loadu(s + c * L), acc[g][c]);
    }
  }
  for (; t < terms; ++t) {
    const Vec<T> wt(w[t * ws]);
    const T* s = src[t] + d0;
    for (int c = 0; c < C; ++c) acc[0][c] = at::vec::fmadd(wt, Vec<T>::loadu(s + c * L), acc[0][c]);
  }
  for (int c = 0; c < C; ++c) {
    Vec<T> sum = acc[0][c];
    for (int g = 1; g < G; ++g) sum = sum + acc[g][c];
    sum.store(out + d0 + c * L);
  }
}

// out[0:D] = sum_t w[t * ws] * src[t][0:D].
template <typename T>
void weighted_sum(const T* w, const T* const* src, int64_t terms, int64_t D, T* out,
                  int64_t ws = 1) {
  constexpr int64_t L = Vec<T>::size();
  int64_t d0 = 0;
  for (; d0 + L <= D; d0 += 4 * L) {
    switch (std::min<int64_t>(4, (D - d0) / L)) {
      case 4: weighted_sum_block<4>(w, ws, src, terms, d0, out); break;
      case 3: weighted_sum_block<3>(w, ws, src, terms, d0, out); break;
      case 2: weighted_sum_block<2>(w, ws, src, terms, d0, out); break;
      default: weighted_sum_block<1>(w, ws, src, terms, d0, out); break;
    }
  }
  for (int64_t d = D - D % L; d < D; ++d) {  // channels past the last full vector
    T sum = T(0);
    for (int64_t t = 0; t < terms; ++t) sum += w[t * ws] * src[t][d];
    out[d] = sum;
  }
}

// ------------------------------------------------------------------ band sums
// A band: X consecutive interior outputs x0 + i of one row and the source positions they
// reach in one row, x0 + (j - kw/2) * d for j < X + KW - 1; output i takes sources i..i+KW-1
// (term t = j - i). Adjacent outputs share KW-1 sources, so each source vector is loaded
// once for up to KW outputs, where the per-query weighted_sum loads it once per output;
// every (i, t) pair is a compile-time constant: no masks, no branches. Over `rows` rows:
//   out[i][c] = sum_r sum_t w[r][i * wx + t * wt] * s[r][(i + t) * s_step + c]
// V vectors of channels per pass: X * V accumulators stay in registers.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBandVectors = 2;  // 16 accumulators + 2 sources of 32 registers
#else
constexpr int kBandVectors = 1;  // 16 registers
#endif

// Outputs per band: 8, or a whole vector when that is shorter (double on AVX2).
template <typename T>
constexpr int band_outputs() { return Vec<T>::size() < 8 ? static_cast<int>(Vec<T>::size()) : 8; }

struct BandRows {
  int64_t rows, wx, wt, s_step;
};

template <int X, int KW, int V, typename T>
void band_block(const T* const* w, const T* const* s, const BandRows& b, T* out,
                int64_t out_step) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc[X][V];
  for (int i = 0; i < X; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = Vec<T>(T(0));
  for (int64_t r = 0; r < b.rows; ++r) {
    const T* wr = w[r];
    const T* sr = s[r];
#pragma GCC unroll 64
    for (int j = 0; j < X + KW - 1; ++j) {
      Vec<T> src[V];
      for (int v = 0; v < V; ++v) src[v] = Vec<T>::loadu(sr + j * b.s_step + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < X; ++i) {
        const int t = j - i;
        if (t < 0 || t >= KW) continue;
        const Vec<T> wv(wr[i * b.wx + t * b.wt]);
        for (int v = 0; v < V; ++v) acc[i][v] = at::vec::fmadd(wv, src[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < X; ++i)
    for (int v = 0; v < V; ++v) acc[i][v].store(out + i * out_step + v * L);
}

// Row pointers of the bands of one run (at most 2k-1 rows: see InverseAxis).
// row_w / row_s: filled by the caller; the rest is band_run's own.
template <typename T>
struct BandScratch {
  std::vector<const T*> row_w, row_s, w, s, channel;
  explicit BandScratch(int64_t kernel)
      : row_w(2 * kernel), row_s(2 * kernel), w(2 * kernel), s(2 * kernel),
        channel(2 * kernel) {}
};

// All channels of one band: passes of V vectors, then single vectors.
template <int KW, typename T>
void band_channels(const T* const* w, const T* const* s, const BandRows& b, int64_t D,
                   T* out, int64_t out_step, const T** shifted) {
  constexpr int X = band_outputs<T>();
  constexpr int64_t L = Vec<T>::size();
  for (int64_t d0 = 0; d0 < D;) {
    const int64_t width = D - d0 >= kBandVectors * L ? kBandVectors * L : L;
    for (int64_t r = 0; r < b.rows; ++r) shifted[r] = s[r] + d0;
    if (width == L) {
      band_block<X, KW, 1>(w, shifted, b, out + d0, out_step);
    } else {
      band_block<X, KW, kBandVectors>(w, shifted, b, out + d0, out_step);
    }
    d0 += width;
  }
}

// Kernel widths with a band kernel (odd, <= 13, no column dilation); the others, and
// channels that are no whole number of vectors, take the per-output paths.
template <typename T>
bool band_supported(const Geometry& g) {
  return g.dw == 1 && g.kw <= 13 && g.D % Vec<T>::size() == 0;
}

// `count` consecutive interior outputs (default: a vector's worth), in bands of
// band_outputs<T>(); scratch.row_w[r] / row_s[r] point at the first output's first weight
// / first source in row r; out is [output][D].
template <typename T>
void band_run(const BandRows& b, const Geometry& g, T* out, BandScratch<T>& scratch,
              int64_t count = Vec<T>::size()) {
  constexpr int X = band_outputs<T>();
  for (int64_t x0 = 0; x0 < count; x0 += X) {
    for (int64_t r = 0; r < b.rows; ++r) {
      scratch.w[r] = scratch.row_w[r] + x0 * b.wx;
      scratch.s[r] = scratch.row_s[r] + x0 * b.s_step;
    }
    const T* const* ws = scratch.w.data();
    const T* const* ss = scratch.s.data();
    T* o = out + x0 * g.D;
    const T** ch = scratch.channel.data();
    switch (g.kw) {
      case 3: band_channels<3>(ws, ss, b, g.D, o, g.D, ch); break;
      case 5: band_channels<5>(ws, ss, b, g.D, o, g.D, ch); break;
      case 7: band_channels<7>(ws, ss, b, g.D, o, g.D, ch); break;
      case 9: band_channels<9>(ws, ss, b, g.D, o, g.D, ch); break;
      case 11: band_channels<11>(ws, ss, b, g.D, o, g.D, ch); break;
      default: band_channels<13>(ws, ss, b, g.D, o, g.D, ch); break;
    }
  }
}

// The band of a query run: weights w_row + m * w_window_row + (lane * wx + n * wt) for
// window row m, sources: the run's key rows in one plane of a map.
template <typename T>
BandRows query_band(const T* w_row, int64_t w_window_row, int64_t wx, int64_t wt,
                    const MapView<T>& map, int64_t plane, const AxisWindow& rw, int64_t j0,
                    const Geometry& g, BandScratch<T>& scratch) {
  for (int64_t m = 0; m < g.kh; ++m) {
    scratch.row_w[m] = w_row + m * w_window_row;
    scratch.row_s[m] = map.at(plane, rw.key(m), j0 - g.kw / 2);
  }
  return {g.kh, wx, wt, map.pixel};
}

// Pointers to the kh*kw neighbors of one query in one plane of a map.
template <typename T>
void neighbor_rows(const MapView<T>& map, int64_t plane, const AxisWindow& rw,
                   const AxisWindow& cw, const Geometry& g, const T** out) {
  const int64_t step = g.dw * map.pixel;
  for (int64_t m = 0; m < g.kh; ++m) {
    const T* first = map.at(plane, rw.key(m), cw.key(0));
    for (int64_t n = 0; n < g.kw; ++n) out[m * g.kw + n] = first + n * step;
  }
}

// Calls block(start, repeated) for blocks of `width` consecutive positions of [0, length)
// inside [first, last], one(i) for every other position. The positions left over after the
// last whole block are covered by one more block that ends at `last` and overlaps its
// predecessor: its first `repeated` positions are done already (the same values are written
// again; sums over positions must skip them).
template <typename BlockFn, typename OneFn>
void walk_blocks(int64_t length, int64_t first, int64_t last, int64_t width, BlockFn&& block,
                 OneFn&& one) {
  const int64_t last_start = last + 1 - width;
  int64_t i = 0;
  while (i < length) {
    if (i >= first && i <= last_start) {
      block(i, int64_t{0});
      i += width;
    } else if (i > first && i <= last && last_start >= first) {
      block(last_start, i - last_start);
      i = last_start + width;
    } else {
      one(i);
      ++i;
    }
  }
}

// ------------------------------------------------------------------ inverse sums
// The queries that see one index of an axis, with the neighbor number the index has in
// each of their windows. At most 2k-1 entries (a window clamped at both borders).
struct InverseAxis {
  std::vector<int64_t> query, neighbor;
  int64_t count = 0;

  explicit InverseAxis(int64_t kernel) : query(2 * kernel), neighbor(2 * kernel) {}
  void fill(int64_t index, int64_t length, int64_t kernel, int64_t dilation,
            const std::vector<int64_t>& starts) {
    const InverseRange range = axis_inverse(index, length, kernel, dilation);
    const int64_t sub = index / dilation;
    count = 0;
    for (int64_t s = range.first; s <= range.last; ++s, ++count) {
      query[count] = range.query(s);
      neighbor[count] = sub - starts[query[count]];
    }
  }
};

// Weights of the inverse sums are neighbor-major: w[plane][row][n][column], so the weights
// of consecutive queries for one neighbor are contiguous.
//
// A key run: Vec<T>::size() consecutive keys of one row at least kw*dw from both column
// borders. Every query that sees such a key has an unclamped window, so key c is neighbor
// n of query column c + (kw/2 - n) * dw exactly (one query per n), and the run is
// vectorized over its keys like the query runs.
template <int N, typename T>
inline void run_inverse_group(const T* const* w_at, const T* const* a_rows, int64_t count,
                              const int64_t* a_offset, int64_t a_shift, int64_t channel_stride,
                              T* out, int64_t out_stride) {
  Vec<T> acc[N];
  for (int i = 0; i < N; ++i) acc[i] = Vec<T>(T(0));
  for (int64_t term = 0; term < count; ++term) {
    const Vec<T> wv = Vec<T>::loadu(w_at[term]);
    const T* a = a_rows[term] + a_offset[term] + a_shift;
    for (int i = 0; i < N; ++i)
      acc[i] = at::vec::fmadd(wv, Vec<T>::loadu(a + i * channel_stride), acc[i]);
  }
  for (int i = 0; i < N; ++i) acc[i].store(out + i * out_stride);
}

// One key row of the inverse sums, with its per-thread buffers:
//   out[key][:] = sum over the (query, neighbor) pairs that reach key of w[q, n] * a[q][:].
// a: the source map; a_t: the same as [plane][row][C][col] (read by key runs without a band
// kernel); w_rows(y): the neighbor-major weights [K2][W] of query row y of the plane.
// Each key gathers its own terms: deterministic, no atomics.
template <typename T>
class InverseRows {
 public:
  InverseRows(const Geometry& g, const std::vector<int64_t>& row_starts,
              const std::vector<int64_t>& col_starts)
      : g_(g), row_starts_(row_starts), band_(band_supported<T>(g)), rows_(g.kh),
        weights_(4 * g.window()), block_(g.D * Vec<T>::size()), sources_(4 * g.window()),
        w_at_(4 * g.window()), w_row_(2 * g.kh), a_row_(2 * g.kh), a_offset_(4 * g.window()),
        scratch_(g.kh), column_first_(g.W + 1) {
    // The (query column, neighbor) pairs that reach each key column, as offsets into a
    // weight row [K2][W] and query columns: looked up, not recomputed, per key.
    InverseAxis cols(g.kw);
    column_w_.reserve(g.W * (2 * g.kw - 1));
    column_a_.reserve(g.W * (2 * g.kw - 1));
    for (int64_t c = 0; c < g.W; ++c) {
      column_first_[c] = static_cast<int64_t>(column_w_.size());
      cols.fill(c, g.W, g.kw, g.dw, col_starts);
      for (int64_t x = 0; x < cols.count; ++x) {
        column_w_.push_back(cols.neighbor[x] * g.W + cols.query[x]);
        column_a_.push_back(cols.query[x]);
      }
    }
    column_first_[g.W] = static_cast<int64_t>(column_w_.size());
  }

  template <typename WeightRows>
  void row(int64_t p, int64_t r, WeightRows&& w_rows, const MapView<T>& a, const T* a_t,
           T* out_row) {
    const Geometry& g = g_;
    const int64_t half = g.kw / 2;
    rows_.fill(r, g.H, g.kh, g.dh, row_starts_);
    for (int64_t y = 0; y < rows_.count; ++y) {  // query row y: its weights of window row m
      w_row_[y] = w_rows(rows_.query[y]) + rows_.neighbor[y] * g.kw * g.W;
      a_row_[y] = a.row(p, rows_.query[y]);
    }
    // Keys in [kw, W - 1 - kw] are seen by unclamped queries only (one per neighbor): bands
    // of X of them, or vector-lane key runs without a band kernel.
    constexpr int64_t X = band_outputs<T>();
    const int64_t reach = g.kw * g.dw;
    // key c + i, term t: query column c + i + t - half, neighbor kw - 1 - t
    auto band = [&](int64_t c, int64_t /*repeated*/) {
      for (int64_t y = 0; y < rows_.count; ++y) {
        scratch_.row_w[y] = w_row_[y] + (g.kw - 1) * g.W + c - half;
        scratch_.row_s[y] = a_row_[y] + (c - half) * a.pixel;
      }
      band_run(BandRows{rows_.count, 1, 1 - g.W, a.pixel}, g, out_row + c * g.D, scratch_, X);
    };
    auto run = [&](int64_t c, int64_t /*repeated*/) { key_run(p, c, a_t, out_row); };
    auto single = [&](int64_t c) {
      const int64_t first = column_first_[c], count = column_first_[c + 1] - first;
      const int64_t* w_offset = column_w_.data() + first;
      const int64_t* a_column = column_a_.data() + first;
      int64_t terms = 0;
      for (int64_t y = 0; y < rows_.count; ++y) {
        const T *w_row = w_row_[y], *a_row = a_row_[y];
        for (int64_t x = 0; x < count; ++x, ++terms) {
          weights_[terms] = w_row[w_offset[x]];
          sources_[terms] = a_row + a_column[x] * a.pixel;
        }
      }
      weighted_sum(weights_.data(), sources_.data(), terms, g.D, out_row + c * g.D);
    };
    if (band_) {
      walk_blocks(g.W, reach, g.W - 1 - reach, X, band, single);
    } else {
      walk_blocks(g.W, reach, g.W - 1 - reach, Vec<T>::size(), run, single);
    }
  }

 private:
  // A key run without a band kernel, vectorized over its keys: every query that sees key
  // c + t has an unclamped window, so it is neighbor n of query column c + t + (half - n) dw.
  void key_run(int64_t p, int64_t c, const T* a_t, T* out_row) {
    constexpr int64_t L = Vec<T>::size();
    const Geometry& g = g_;
    const int64_t half = g.kw / 2;
    int64_t terms = 0;
    for (int64_t y = 0; y < rows_.count; ++y) {
      const int64_t qi = p * g.H + rows_.query[y];
      const T* w_row = w_row_[y];
      for (int64_t n = 0; n < g.kw; ++n, ++terms) {
        const int64_t column = c + (half - n) * g.dw;
        w_at_[terms] = w_row + n * g.W + column;
        sources_[terms] = a_t + qi * g.D * g.W;
        a_offset_[terms] = column;
      }
    }
    for (int64_t d0 = 0; d0 < g.D; d0 += 8) {
      T* dst = block_.data() + d0 * L;
      const T* const* wa = w_at_.data();
      const T* const* src = sources_.data();
      const int64_t *ao = a_offset_.data(), shift = d0 * g.W;
      switch (std::min<int64_t>(8, g.D - d0)) {
        case 8: run_inverse_group<8>(wa, src, terms, ao, shift, g.W, dst, L); break;
        case 7: run_inverse_group<7>(wa, src, terms, ao, shift, g.W, dst, L); break;
        case 6: run_inverse_group<6>(wa, src, terms, ao, shift, g.W, dst, L); break;
        case 5: run_inverse_group<5>(wa, src, terms, ao, shift, g.W, dst, L); break;
        case 4: run_inverse_group<4>(wa, src, terms, ao, shift, g.W, dst, L); break;
        case 3: run_inverse_group<3>(wa, src, terms, ao, shift, g.W, dst, L); break;
        case 2: run_inverse_group<2>(wa, src, terms, ao, shift, g.W, dst, L); break;
        default: run_inverse_group<1>(wa, src, terms, ao, shift, g.W, dst, L); break;
      }
    }
    for (int64_t t = 0; t < L; ++t)
      for (int64_t d = 0; d < g.D; ++d) out_row[(c + t) * g.D + d] = block_[d * L + t];
  }

  const Geometry& g_;
  const std::vector<int64_t>& row_starts_;
  const bool band_;
  InverseAxis rows_;
  std::vector<T> weights_, block_;
  std::vector<const T*> sources_, w_at_, w_row_, a_row_;
  std::vector<int64_t> a_offset_;
  BandScratch<T> scratch_;
  std::vector<int64_t> column_first_, column_w_, column_a_;
};

// The inverse sums of whole maps: w [plane][row][K2][W]. Parallel over key rows.
template <typename T>
void inverse_sum(const T* w, const MapView<T>& a, const T* a_t, const Geometry& g, T* out) {
  const std::vector<int64_t> row_starts = window_starts(g.H, g.kh, g.dh);
  const std::vector<int64_t> col_starts = window_starts(g.W, g.kw, g.dw);
  const int64_t map_row = g.window() * g.W;
  at::parallel_for(0, g.planes * g.H, g.row_grain(), [&](int64_t begin, int64_t end) {
    InverseRows<T> inverse(g, row_starts, col_starts);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / g.H;
      const T* w_plane = w + p * g.H * map_row;
      inverse.row(p, task % g.H, [&](int64_t y) { return w_plane + y * map_row; }, a, a_t,
                  out + task * g.W * g.D);
    }
  });
}

// [plane][row][col][n] -> [plane][row][n][col], the layout inverse_sum reads.
template <typename T>
at::Tensor neighbor_major(const at::Tensor& w, const Geometry& g) {
  const T* src = w.data_ptr<T>();
  const int64_t row = g.W * g.window();
  return transposed_rows<T>([&](int64_t r) { return src + r * row; }, g.window(),
                            g.planes * g.H, g.W, g.window(), w.options());
}

// ------------------------------------------------------------------ rpb gradient
// Accumulate one query's window gradients into its plane-row's bias bins.
template <typename T, typename Acc>
void accumulate_bias_grad(const T* grad, const AxisWindow& rw, const AxisWindow& cw,
                          const Geometry& g, Acc* bins) {
  const int64_t bias_width = 2 * g.kw - 1;
  for (int64_t m = 0; m < g.kh; ++m) {
    Acc* row = bins + rw.bias(m, g.kh) * bias_width + cw.bias(0, g.kw);
    const T* gr = grad + m * g.kw;
    for (int64_t n = 0; n < g.kw; ++n) row[n] += static_cast<Acc>(gr[n]);
  }
}

// partial [planes * H, bins] -> [heads, bins], summed over batch and rows in a fixed order.
at::Tensor reduce_bias_grad(const at::Tensor& partial, const Geometry& g) {
  at::Tensor out = at::zeros({g.heads, 2 * g.kh - 1, 2 * g.kw - 1}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "nat_mm_reduce_bias_grad", [&] {
    const scalar_t* src = partial.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t bins = g.bias_bins();
    at::parallel_for(0, g.heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        for (int64_t b = 0; b < g.batch; ++b) {
          for (int64_t i = 0; i < g.H; ++i) {
            const scalar_t* row = src + ((b * g.heads + h) * g.H + i) * bins;
            for (int64_t k = 0; k < bins; ++k) dst[h * bins + k] += row[k];
          }
        }
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------ interior runs
// A run is Vec<T>::size() consecutive queries of one row whose column windows are all
// unclamped: neighbor n of query j0 + t is column j0 + t + (n - kw/2) * dw for every t.
// Runs are vectorized over their queries (one lane each) on [row][channel][column] copies
// of both operands in natural column order: every lane useful, no horizontal sums.
// Run buffers hold one vector per neighbor: buf[(m * kw + n) * L + t].

template <int N, typename T>
inline void run_dot_group(const T* a, int64_t a_stride, const T* b, int64_t b_stride,
                          int64_t dilation, int64_t D, T* out) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc[N];
  for (int i = 0; i < N; ++i) acc[i] = Vec<T>(T(0));
  for (int64_t ch = 0; ch < D; ++ch) {
    const Vec<T> av = Vec<T>::loadu(a + ch * a_stride);
    const T* bc = b + ch * b_stride;
    for (int i = 0; i < N; ++i) acc[i] = at::vec::fmadd(av, Vec<T>::loadu(bc + i * dilation), acc[i]);
  }
  for (int i = 0; i < N; ++i) acc[i].store(out + i * L);
}

// buf[(m*kw + n)*L + t] = a[query j0 + t] . b[key row m, column j0 + t + (n - kw/2) dw].
// a_row: the query row of a as it is, [W][C] with columns a_pixel apart: the run's queries
// are transposed into a_block ([C][L], in cache) rather than the whole map; b_rows[m]: window
// row m of b, transposed in natural column order ([C][W]).
template <typename T>
void run_scores(const T* a_row, int64_t a_pixel, const T* const* b_rows, int64_t j0,
                const Geometry& g, T* a_block, T* buf) {
  constexpr int64_t L = Vec<T>::size();
  transpose(a_row + j0 * a_pixel, a_pixel, a_block, L, L, g.D);
  const int64_t first_column = j0 - (g.kw / 2) * g.dw;
  for (int64_t m = 0; m < g.kh; ++m) {
    const T* b_row = b_rows[m] + first_column;
    for (int64_t n0 = 0; n0 < g.kw; n0 += 8) {
      const T* b = b_row + n0 * g.dw;
      T* out = buf + (m * g.kw + n0) * L;
      switch (std::min<int64_t>(8, g.kw - n0)) {
        case 8: run_dot_group<8>(a_block, L, b, g.W, g.dw, g.D, out); break;
        case 7: run_dot_group<7>(a_block, L, b, g.W, g.dw, g.D, out); break;
        case 6: run_dot_group<6>(a_block, L, b, g.W, g.dw, g.D, out); break;
        case 5: run_dot_group<5>(a_block, L, b, g.W, g.dw, g.D, out); break;
        case 4: run_dot_group<4>(a_block, L, b, g.W, g.dw, g.D, out); break;
        case 3: run_dot_group<3>(a_block, L, b, g.W, g.dw, g.D, out); break;
        case 2: run_dot_group<2>(a_block, L, b, g.W, g.dw, g.D, out); break;
        default: run_dot_group<1>(a_block, L, b, g.W, g.dw, g.D, out); break;
      }
    }
  }
}

// The bias of every neighbor of an interior query of one row (the same for the whole run):
// column bias index n + kw/2.
template <typename T>
void run_bias(const T* rpb_head, const AxisWindow& rw, const Geometry& g, T* out) {
  for (int64_t m = 0; m < g.kh; ++m) {
    const T* bias = rpb_head + rw.bias(m, g.kh) * (2 * g.kw - 1) + g.kw / 2;
    for (int64_t n = 0; n < g.kw; ++n) out[m * g.kw + n] = bias[n];
  }
}

// exp of the softmax: at::vec's exp_u20 (float: a degree-5 polynomial within 20 ulp, the exp
// of PyTorch's CPU flash attention; Sleef's exp took 7% of the fused forward), with NaN kept
// (exp_u20 clamps NaN to a finite value; non-finite logits must give NaN as torch.softmax).
template <typename T>
inline Vec<T> softmax_exp(const Vec<T>& x) {
  return Vec<T>::blendv(x.exp_u20(), x, x.isnan());
}

// buf <- softmax over neighbors of (buf * scale + bias), lane by lane; lse[t] <- log-sum-exp.
template <typename T>
void run_softmax(T* buf, int64_t window, const T* bias, T scale, T* lse) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const V vscale(scale);
  V max(-std::numeric_limits<T>::infinity());
  for (int64_t n = 0; n < window; ++n) {
    V x = V::loadu(buf + n * L) * vscale;
    if (bias) x = x + V(bias[n]);
    x.store(buf + n * L);
    max = at::vec::maximum(max, x);
  }
  V sum(T(0));
  for (int64_t n = 0; n < window; ++n) {
    const V e = softmax_exp(V::loadu(buf + n * L) - max);
    e.store(buf + n * L);
    sum = sum + e;
  }
  const V inv = V(T(1)) / sum;
  for (int64_t n = 0; n < window; ++n) (V::loadu(buf + n * L) * inv).store(buf + n * L);
  (max + sum.log()).store(lse);
}

// buf <- exp(buf * scale + bias - lse), lane by lane: the probabilities, recomputed.
template <typename T>
void run_probabilities(T* buf, int64_t window, const T* bias, T scale, const T* lse) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const V vscale(scale), vlse = V::loadu(lse);
  for (int64_t n = 0; n < window; ++n) {
    V x = V::loadu(buf + n * L) * vscale - vlse;
    if (bias) x = x + V(bias[n]);
    softmax_exp(x).store(buf + n * L);
  }
}

// ------------------------------------------------------------------ softmax
// Horizontal max and sum of count values (vectorized: no scalar dependency chains).
template <typename T>
T max_of(const T* s, int64_t count) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const V lowest(-std::numeric_limits<T>::infinity());
  V acc = lowest;
  int64_t i = 0;
  for (; i + L <= count; i += L) acc = at::vec::maximum(acc, V::loadu(s + i));
  if (i < count) acc = at::vec::maximum(acc, V::set(lowest, V::loadu(s + i, count - i), count - i));
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, acc);
}

// In place: s <- exp(s - shift); returns the sum of the results.
template <typename T>
T exp_shifted(T* s, int64_t count, T shift) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const V vshift(shift);
  V sum(T(0));
  int64_t i = 0;
  for (; i + L <= count; i += L) {
    const V e = softmax_exp(V::loadu(s + i) - vshift);
    e.store(s + i);
    sum = sum + e;
  }
  if (i < count) {
    const V e = softmax_exp(V::loadu(s + i, count - i) - vshift);
    e.store(s + i, count - i);
    sum = sum + V::set(V(T(0)), e, count - i);
  }
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, sum);
}

// s[i] = s[i] * factor, vectorized.
template <typename T>
void scale_in_place(T* s, int64_t count, T factor) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  const V f(factor);
  int64_t i = 0;
  for (; i + L <= count; i += L) (V::loadu(s + i) * f).store(s + i);
  if (i < count) (V::loadu(s + i, count - i) * f).store(s + i, count - i);
}

template <typename T>
T dot(const T* a, const T* b, int64_t count) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  V acc(T(0));
  int64_t i = 0;
  for (; i + L <= count; i += L) acc = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc);
  if (i < count) acc = at::vec::fmadd(V::loadu(a + i, count - i), V::loadu(b + i, count - i), acc);
  return at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc);
}

// In place: s <- softmax(s); returns log(sum(exp(s))). Non-finite logits give NaN as in
// torch.softmax (inf - inf, NaN max), never a silently finite answer.
template <typename T>
T softmax_in_place(T* s, int64_t count) {
  const T max = max_of(s, count);
  const T sum = exp_shifted(s, count, max);
  scale_in_place(s, count, T(1) / sum);
  return max + std::log(sum);
}

// Everything one query row needs: its window rows and every column's window.
struct QueryRow {
  int64_t plane, row;
  AxisWindow rw;
};

// Parallel over the query rows of all planes, in order within a thread's chunk; the chunk
// makes its buffers once (make_state()) and hands them to every body(row, state).
template <typename MakeState, typename F>
void for_each_query_row(const Geometry& g, MakeState&& make_state, F&& body) {
  at::parallel_for(0, g.planes * g.H, g.row_grain(), [&](int64_t begin, int64_t end) {
    auto state = make_state();
    for (int64_t task = begin; task < end; ++task) {
      QueryRow q{task / g.H, task % g.H, axis_window(task % g.H, g.H, g.kh, g.dh)};
      body(q, state);
    }
  });
}

template <typename F>
void for_each_query_row(const Geometry& g, F&& body) {
  for_each_query_row(g, [] { return 0; }, [&](const QueryRow& q, int) { body(q); });
}

// Calls run(j0, repeated) for interior runs of Vec<T>::size() queries of a row, and
// queries(j, count, window of j) for the other queries (border queries, and rows too narrow
// for a run) in groups of up to kWindowQueries consecutive queries with the same window (the
// clamped queries at a border), one query otherwise. The interior queries left over after
// the last whole run are covered by one more run that ends at the last interior query and
// overlaps its predecessor: its first `repeated` lanes are queries already done (the same
// values are written again; sums over queries must skip them).
template <typename T, typename RunFn, typename QueriesFn>
void walk_row(const Geometry& g, RunFn&& run, QueriesFn&& queries) {
  const int64_t reach = (g.kw / 2) * g.dw;
  int64_t first = 0, count = 0;
  AxisWindow window{};
  auto flush = [&] {
    if (count > 0) queries(first, count, window);
    count = 0;
  };
  walk_blocks(g.W, reach, g.W - 1 - reach, Vec<T>::size(), [&](int64_t j0, int64_t repeated) {
    flush();
    run(j0, repeated);
  }, [&](int64_t j) {
    const AxisWindow cw = axis_window(j, g.W, g.kw, g.dw);
    // consecutive columns share a window only without column dilation (else residues differ)
    if (count > 0 && count < kWindowQueries && g.dw == 1 && cw.start == window.start) {
      ++count;
      return;
    }
    flush();
    first = j;
    count = 1;
    window = cw;
  });
  flush();
}

// Transposed copies ([channel][position] + a vector of zeroed slack) of single rows of a
// map, made on first use into a small direct-mapped cache of one
// thread. A query row's window rows are mostly its predecessor's, so each row is copied
// about once per thread and stays in cache; no whole-map copy is made (a fresh temporary of
// tens of MB page-faults on every call: ~1/4 of the fused backward at cls stage 1).
template <typename T>
class RowCopies {
 public:
  RowCopies(const MapView<T>& map, const Geometry& g, const ColumnOrder& order)
      : map_(map), g_(g), slots_((g.kh + 1) * g.dh), size_(g.D * g.W + Vec<T>::size()),
        tag_(slots_, -1),
        gathered_(order.dilation > 1 ? g.W * g.D : 0), column_at_(g.W) {
    for (int64_t c = 0; c < g.W; ++c) column_at_[order.position(c)] = c;
  }

  const T* row(int64_t plane, int64_t row) {
    const Geometry& g = g_;
    // The rows of one window span (kh-1)*dh+1 < slots rows: they never share a slot.
    const int64_t tag = plane * g.H + row, slot = row % slots_;
    if (tag_[slot] == tag) return data_.data() + slot * size_;
    // allocated on first use: a cache may stay unused (grouped when dw == 1)
    if (data_.empty()) data_.assign(slots_ * size_, T(0));
    T* dst = data_.data() + slot * size_;
    tag_[slot] = tag;
    const T* src = map_.row(plane, row);
    int64_t pixel = map_.pixel;
    if (!gathered_.empty()) {  // residue-class order: gather the columns first
      for (int64_t pos = 0; pos < g.W; ++pos)
        std::copy_n(src + column_at_[pos] * pixel, g.D, gathered_.data() + pos * g.D);
      src = gathered_.data();
      pixel = g.D;
    }
    transpose(src, pixel, dst, g.W, g.W, g.D);
    return dst;
  }

 private:
  const MapView<T> map_;
  const Geometry& g_;
  const int64_t slots_, size_;
  std::vector<T> data_;
  std::vector<int64_t> tag_;
  std::vector<T> gathered_;
  std::vector<int64_t> column_at_;
};

// The window rows of one query row as the score kernels read them: in natural column order
// (runs) and in residue-class order (single queries; the same copies when dw == 1).
template <typename T>
class WindowRows {
 public:
  WindowRows(const MapView<T>& map, const Geometry& g, const ColumnOrder& order)
      : g_(g), natural_(map, g, ColumnOrder(g.W, 1)), grouped_(map, g, order),
        has_runs_(g.W - 2 * (g.kw / 2) * g.dw >= Vec<T>::size()), natural_rows_(g.kh),
        grouped_rows_(g.kh) {}

  void load(int64_t plane, const AxisWindow& rw) {
    for (int64_t m = 0; m < g_.kh; ++m) {
      if (has_runs_) natural_rows_[m] = natural_.row(plane, rw.key(m));
      grouped_rows_[m] =
          g_.dw == 1 && has_runs_ ? natural_rows_[m] : grouped_.row(plane, rw.key(m));
    }
  }
  const T* const* natural() const { return natural_rows_.data(); }
  const T* const* grouped() const { return grouped_rows_.data(); }

 private:
  const Geometry& g_;
  RowCopies<T> natural_, grouped_;
  const bool has_runs_;
  std::vector<const T*> natural_rows_, grouped_rows_;
};

// The per-thread buffers of the forward ops' query rows (scores of a query or a run, the
// run's transposed queries and bias, neighbor pointers) and their key-row copies.
template <typename T>
struct ForwardRowState {
  std::vector<T> scores, run, bias, a_block;
  std::vector<const T*> neighbors;
  BandScratch<T> band;
  WindowRows<T> keys;
  ForwardRowState(const MapView<T>& key, const Geometry& g, const ColumnOrder& order)
      : scores(kWindowQueries * stride(g)), run(g.window() * Vec<T>::size()),
        bias(g.window(), T(0)), a_block(g.D * Vec<T>::size()), neighbors(g.window()),
        band(g.kh), keys(key, g, order) {}
  // Loads the key rows of qr's window and the bias of its runs (zeros without rpb).
  // stride(g): the distance between two queries' scores (window_scores).
  void start_row(const QueryRow& qr, const T* rpb_head, const Geometry& g) {
    keys.load(qr.plane, qr.rw);
    if (rpb_head) run_bias(rpb_head, qr.rw, g, bias.data());
  }
  static int64_t stride(const Geometry& g) { return g.window() + Vec<T>::size(); }
};

template <typename T>
const T* optional_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------ fused backward
// Everything the query side of the fused backward reads, and where it writes grad_q and
// the rpb bins.
template <typename T>
struct BackwardInputs {
  const Geometry& g;
  const ColumnOrder& order;
  const MapView<T> q, k, v, go, out;
  const T *lp, *glp, *bp;  // lse, grad_lse (or null), rpb (or null)
  T *gqp, *bins;
  const T scale;
  const bool band;

  BackwardInputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                 const at::Tensor& go_, const at::Tensor& o, const at::Tensor& lse,
                 const at::Tensor& grad_lse, const at::Tensor& bias, const ColumnOrder& order_,
                 const Geometry& g_, double scale_, at::Tensor& grad_q, at::Tensor& partial)
      : g(g_), order(order_), q(q_), k(k_), v(v_), go(go_), out(o), lp(lse.data_ptr<T>()),
        glp(optional_data<T>(grad_lse)), bp(optional_data<T>(bias)),
        gqp(grad_q.data_ptr<T>()), bins(partial.data_ptr<T>()),
        scale(static_cast<T>(scale_)), band(band_supported<T>(g_)) {}

  // grad_out . out of query q_index, less lse's gradient there: ds = p (dp - delta)
  // then also carries d lse / d logits = p
  T delta(const T* go_pixel, const T* out_pixel, int64_t q_index) const {
    const T d = dot(go_pixel, out_pixel, g.D);
    return glp ? d - glp[q_index] : d;
  }
};

// The query side of one row, with its per-thread buffers: the probabilities p and the
// scaled logit gradients ds = scale * p * (dp - delta) of every query into
// neighbor-major map rows [K2][W]; for a row it owns, also grad_q and the rpb bins.
template <typename T>
class BackwardQueryRows {
 public:
  explicit BackwardQueryRows(const BackwardInputs<T>& in)
      : in_(in), K2_(in.g.window()), p_(kWindowQueries * (K2_ + L)),
        dp_(kWindowQueries * (K2_ + L)), run_p_(K2_ * L),
        run_dp_(K2_ * L), run_bias_row_(K2_), delta_(L), run_bins_(K2_ * L), a_block_(in.g.D * L),
        neighbors_(K2_), scratch_(in.g.kh), k_rows_(in.k, in.g, in.order),
        v_rows_(in.v, in.g, in.order) {}

  void row(int64_t plane, int64_t row, T* p_map, T* ds_map, bool own) {
    const Geometry& g = in_.g;
    const QueryRow qr{plane, row, axis_window(row, g.H, g.kh, g.dh)};
    const T* rpb_head = in_.bp ? in_.bp + (plane % g.heads) * g.bias_bins() : nullptr;
    if (rpb_head) run_bias(rpb_head, qr.rw, g, run_bias_row_.data());
    k_rows_.load(plane, qr.rw);
    v_rows_.load(plane, qr.rw);
    // rpb gradient of the row's runs: every run of a row puts neighbor n in the same bias
    // bin, so ds is summed lane-wise over the runs and reduced across lanes once per row.
    std::fill(run_bins_.begin(), run_bins_.end(), T(0));
    bool any_run = false;
    const int64_t row_task = plane * g.H + row, row_q0 = row_task * g.W;
    q_row_ = in_.q.row(plane, row);
    go_row_ = in_.go.row(plane, row);
    out_row_ = in_.out.row(plane, row);
    T* row_bins = in_.bins + row_task * g.bias_bins();
    walk_row<T>(g, [&](int64_t j0, int64_t repeated) {
      run(qr, j0, repeated, rpb_head, p_map, ds_map, own);
      any_run = true;
    }, [&](int64_t j0, int64_t count, const AxisWindow& window) {  // sharing one window
      const int64_t stride = K2_ + L;
      const T* go0 = go_row_ + j0 * in_.go.pixel;
      window_scores(q_row_ + j0 * in_.q.pixel, in_.q.pixel, count, k_rows_.grouped(), window,
                    in_.order, g, p_.data(), stride);
      window_scores(go0, in_.go.pixel, count, v_rows_.grouped(), window, in_.order, g,
                    dp_.data(), stride);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t j = j0 + t, q_index = row_q0 + j;
        const AxisWindow cw = axis_window(j, g.W, g.kw, g.dw);
        // p = exp(logits - lse), recomputed; dp = grad_out . v[neighbor];
        // ds = p * (dp - delta)
        T *p = p_.data() + t * stride, *ds = dp_.data() + t * stride;
        scale_in_place(p, K2_, in_.scale);
        if (rpb_head) add_bias(p, rpb_head, qr.rw, cw, g);
        exp_shifted(p, K2_, in_.lp[q_index]);
        const T d = in_.delta(go0 + t * in_.go.pixel, out_row_ + j * in_.out.pixel, q_index);
        for (int64_t n = 0; n < K2_; ++n) ds[n] = p[n] * (ds[n] - d);
        if (own) accumulate_bias_grad(ds, qr.rw, cw, g, row_bins);
        for (int64_t n = 0; n < K2_; ++n) {
          ds[n] *= in_.scale;
          p_map[n * g.W + j] = p[n];
          ds_map[n * g.W + j] = ds[n];
        }
        if (own) grad_query(qr, j, ds, 1);
      }
    });
    if (own && any_run) {
      using V = Vec<T>;
      const int64_t half = g.kw / 2, bias_width = 2 * g.kw - 1;
      for (int64_t n = 0; n < K2_; ++n) {
        const int64_t m = n / g.kw, c = n % g.kw;
        row_bins[qr.rw.bias(m, g.kh) * bias_width + c + half] += at::vec::vec_reduce_all<T>(
            [](V& a, V& b) { return a + b; }, V::loadu(run_bins_.data() + n * L));
      }
    }
  }

 private:
  static constexpr int64_t L = Vec<T>::size();

  // One interior run of queries j0 .. j0 + L - 1, vectorized over the run; its first
  // `repeated` lanes were done by the previous run (see walk_row).
  void run(const QueryRow& qr, int64_t j0, int64_t repeated, const T* rpb_head, T* p_map,
           T* ds_map, bool own) {
    using V = Vec<T>;
    const Geometry& g = in_.g;
    const int64_t row_q0 = (qr.plane * g.H + qr.row) * g.W;
    run_scores(q_row_, in_.q.pixel, k_rows_.natural(), j0, g, a_block_.data(), run_p_.data());
    run_probabilities(run_p_.data(), K2_, rpb_head ? run_bias_row_.data() : nullptr,
                      in_.scale, in_.lp + row_q0 + j0);
    run_scores(go_row_, in_.go.pixel, v_rows_.natural(), j0, g, a_block_.data(),
               run_dp_.data());
    for (int64_t t = 0; t < L; ++t) {
      const int64_t j = j0 + t;
      delta_[t] = in_.delta(go_row_ + j * in_.go.pixel, out_row_ + j * in_.out.pixel,
                            row_q0 + j);
    }
    const V vdelta = V::loadu(delta_.data()), vscale(in_.scale);
    for (int64_t n = 0; n < K2_; ++n) {  // ds = p * (dp - delta): bins; scaled: the rest
      const V pn = V::loadu(run_p_.data() + n * L);
      const V ds = pn * (V::loadu(run_dp_.data() + n * L) - vdelta);
      if (own) {
        const V fresh = repeated ? V::set(ds, V(T(0)), repeated) : ds;
        (V::loadu(run_bins_.data() + n * L) + fresh).store(run_bins_.data() + n * L);
      }
      const V scaled = ds * vscale;
      scaled.store(run_dp_.data() + n * L);
      pn.store(p_map + n * g.W + j0);
      scaled.store(ds_map + n * g.W + j0);
    }
    if (!own) return;
    if (in_.band) {
      band_run(query_band(run_dp_.data(), g.kw * L, 1, L, in_.k, qr.plane, qr.rw, j0, g,
                          scratch_),
               g, in_.gqp + (row_q0 + j0) * g.D, scratch_);
    } else {
      for (int64_t t = 0; t < L; ++t) grad_query(qr, j0 + t, run_dp_.data() + t, L);
    }
  }

  // grad_q[q] = sum_n ds[n * stride] k[neighbor n of query j]  (ds carries the scale)
  void grad_query(const QueryRow& qr, int64_t j, const T* ds, int64_t stride) {
    const Geometry& g = in_.g;
    neighbor_rows(in_.k, qr.plane, qr.rw, axis_window(j, g.W, g.kw, g.dw), g,
                  neighbors_.data());
    weighted_sum(ds, neighbors_.data(), K2_, g.D,
                 in_.gqp + ((qr.plane * g.H + qr.row) * g.W + j) * g.D, stride);
  }

  const BackwardInputs<T>& in_;
  const int64_t K2_;
  std::vector<T> p_, dp_, run_p_, run_dp_, run_bias_row_, delta_, run_bins_, a_block_;
  std::vector<const T*> neighbors_;
  BandScratch<T> scratch_;
  WindowRows<T> k_rows_, v_rows_;
  const T *q_row_ = nullptr, *go_row_ = nullptr, *out_row_ = nullptr;  // of the current row
};

// The fused backward's parallel work: (plane, row residue) units, each split into
// per_unit segments of consecutive sub-grid rows when there are fewer units than threads
// (a segment recomputes the maps of up to 2(k-1) halo rows, so segments stay >= 4k rows).
struct BackwardSegments {
  int64_t units, per_unit, grain;
  explicit BackwardSegments(const Geometry& g) : units(g.planes * g.dh), per_unit(1) {
    const int64_t threads = at::get_num_threads();
    const int64_t most = std::max<int64_t>(1, g.H / g.dh / (4 * g.kh));
    while (per_unit < most && (units * per_unit) % threads != 0 && units * per_unit < 4 * threads)
      ++per_unit;
    const int64_t work = std::max<int64_t>(1, g.H / g.dh / per_unit * g.W * g.window() * g.D);
    grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work);
  }
};

}  // namespace

// ================================================================== ops
at::Tensor na2d_qk_cpu(const at::Tensor& query, const at::Tensor& key,
                       const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                       at::IntArrayRef dilation) {
  check_qk_args(query, key, rpb, kernel_size, dilation);
  const Geometry g(query, kernel_size, dilation);
  const at::Tensor q = as_compute_map(query), k = as_compute_map(key);
  const at::Tensor bias = is_given(rpb) ? as_compute(*rpb) : at::Tensor();
  at::Tensor attn = scratch_empty(attn_sizes(g), q.options());
  const ColumnOrder order(g.W, g.dw);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nat_mm_na2d_qk_cpu", [&] {
    using T = scalar_t;
    constexpr int64_t L = Vec<T>::size();
    const MapView<T> qm(q), km(k);
    const T* bp = optional_data<T>(bias);
    T* out = attn.data_ptr<T>();
    const int64_t K2 = g.window();
    auto make_state = [&] { return ForwardRowState<T>(km, g, order); };
    for_each_query_row(g, make_state, [&](const QueryRow& qr, ForwardRowState<T>& st) {
      const T* rpb_head = bp ? bp + (qr.plane % g.heads) * g.bias_bins() : nullptr;
      st.start_row(qr, rpb_head, g);
      const int64_t row_q0 = (qr.plane * g.H + qr.row) * g.W;
      const T* q_row = qm.row(qr.plane, qr.row);
      walk_row<T>(g, [&](int64_t j0, int64_t /*repeated*/) {
        run_scores(q_row, qm.pixel, st.keys.natural(), j0, g,
                   st.a_block.data(), st.run.data());
        T* dst = out + (row_q0 + j0) * K2;
        for (int64_t n = 0; n < K2; ++n)
          for (int64_t t = 0; t < L; ++t) dst[t * K2 + n] = st.run[n * L + t] + st.bias[n];
      }, [&](int64_t j0, int64_t count, const AxisWindow& window) {
        window_scores(q_row + j0 * qm.pixel, qm.pixel, count, st.keys.grouped(), window,
                      order, g, st.scores.data(), st.stride(g));
        for (int64_t t = 0; t < count; ++t) {
          T* scores = st.scores.data() + t * st.stride(g);
          const AxisWindow cw = axis_window(j0 + t, g.W, g.kw, g.dw);
          if (rpb_head) add_bias(scores, rpb_head, qr.rw, cw, g);
          std::copy_n(scores, K2, out + (row_q0 + j0 + t) * K2);
        }
      });
    });
  });
  return attn.to(query.scalar_type());
}

at::Tensor na2d_av_cpu(const at::Tensor& attn, const at::Tensor& value,
                       at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  check_weights_args(attn, "attn", value, "value", kernel_size, dilation);
  const Geometry g(value, kernel_size, dilation);
  const at::Tensor a = as_compute(attn), v = as_compute_map(value);
  at::Tensor out = scratch_empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "nat_mm_na2d_av_cpu", [&] {
    using T = scalar_t;
    const T* ap = a.data_ptr<T>();
    const MapView<T> vm(v);
    T* op = out.data_ptr<T>();
    for_each_query_row(g, [&](const QueryRow& qr) {
      std::vector<const T*> neighbors(g.window());
      for (int64_t j = 0; j < g.W; ++j) {
        const AxisWindow cw = axis_window(j, g.W, g.kw, g.dw);
        const int64_t q_index = (qr.plane * g.H + qr.row) * g.W + j;
        neighbor_rows(vm, qr.plane, qr.rw, cw, g, neighbors.data());
        weighted_sum(ap + q_index * g.window(), neighbors.data(), g.window(), g.D,
                     op + q_index * g.D);
      }
    });
  });
  return out.to(value.scalar_type());
}

at::Tensor na2d_inverse_cpu(const at::Tensor& weights, const at::Tensor& source,
                            at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  check_weights_args(weights, "weights", source, "source", kernel_size, dilation);
  const Geometry g(source, kernel_size, dilation);
  const at::Tensor w = as_compute(weights), a = as_compute_map(source);
  at::Tensor out = scratch_empty(a.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "nat_mm_na2d_inverse_cpu", [&] {
    using T = scalar_t;
    const MapView<T> am(a);
    const at::Tensor a_t =  // read by key runs without a band kernel only
        band_supported<T>(g) ? at::Tensor() : channels_by_column<T>(am, g, a.options());
    const at::Tensor w_n = neighbor_major<T>(w, g);
    inverse_sum(w_n.data_ptr<T>(), am, optional_data<T>(a_t), g, out.data_ptr<T>());
  });
  return out.to(source.scalar_type());
}

at::Tensor na2d_rpb_grad_cpu(const at::Tensor& grad_attn, at::IntArrayRef kernel_size,
                             at::IntArrayRef dilation) {
  check_rpb_grad_args(grad_attn, kernel_size, dilation);
  const Geometry g(grad_attn, kernel_size, dilation);  // D here is the window size
  const at::Tensor ga = as_compute(grad_attn);
  at::Tensor partial = at::zeros({g.planes * g.H, g.bias_bins()}, ga.options());
  AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "nat_mm_na2d_rpb_grad_cpu", [&] {
    using T = scalar_t;
    const T* gp = ga.data_ptr<T>();
    T* bins = partial.data_ptr<T>();
    for_each_query_row(g, [&](const QueryRow& qr) {
      T* row_bins = bins + (qr.plane * g.H + qr.row) * g.bias_bins();
      for (int64_t j = 0; j < g.W; ++j) {
        const AxisWindow cw = axis_window(j, g.W, g.kw, g.dw);
        const int64_t q_index = (qr.plane * g.H + qr.row) * g.W + j;
        accumulate_bias_grad(gp + q_index * g.window(), qr.rw, cw, g, row_bins);
      }
    });
  });
  return reduce_bias_grad(partial, g).to(grad_attn.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> na2d_fused_cpu(const at::Tensor& query,
                                                  const at::Tensor& key,
                                                  const at::Tensor& value,
                                                  const std::optional<at::Tensor>& rpb,
                                                  at::IntArrayRef kernel_size,
                                                  at::IntArrayRef dilation, double scale) {
  check_fused_args(query, key, value, rpb, kernel_size, dilation);
  const Geometry g(query, kernel_size, dilation);
  const at::Tensor q = as_compute_map(query), k = as_compute_map(key);
  const at::Tensor v = as_compute_map(value);
  const at::Tensor bias = is_given(rpb) ? as_compute(*rpb) : at::Tensor();
  at::Tensor out = scratch_empty(q.sizes(), q.options());
  at::Tensor lse = scratch_empty({g.batch, g.heads, g.H, g.W}, q.options());
  const ColumnOrder order(g.W, g.dw);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nat_mm_na2d_fused_cpu", [&] {
    using T = scalar_t;
    constexpr int64_t L = Vec<T>::size();
    const MapView<T> qm(q), km(k), vm(v);
    const T* bp = optional_data<T>(bias);
    T *op = out.data_ptr<T>(), *lp = lse.data_ptr<T>();
    const T s = static_cast<T>(scale);
    const int64_t K2 = g.window();
    const bool band = band_supported<T>(g);
    auto make_state = [&] { return ForwardRowState<T>(km, g, order); };
    for_each_query_row(g, make_state, [&](const QueryRow& qr, ForwardRowState<T>& st) {
      const T* rpb_head = bp ? bp + (qr.plane % g.heads) * g.bias_bins() : nullptr;
      st.start_row(qr, rpb_head, g);
      const int64_t row_q0 = (qr.plane * g.H + qr.row) * g.W;
      const T* q_row = qm.row(qr.plane, qr.row);
      // out[q] = sum_n p[n * stride] v[neighbor n of query j]
      auto attend = [&](int64_t j, const T* p, int64_t stride) {
        neighbor_rows(vm, qr.plane, qr.rw, axis_window(j, g.W, g.kw, g.dw), g,
                      st.neighbors.data());
        weighted_sum(p, st.neighbors.data(), K2, g.D, op + (row_q0 + j) * g.D, stride);
      };
      walk_row<T>(g, [&](int64_t j0, int64_t /*repeated*/) {
        T* run = st.run.data();
        run_scores(q_row, qm.pixel, st.keys.natural(), j0, g,
                   st.a_block.data(), run);
        run_softmax(run, K2, rpb_head ? st.bias.data() : nullptr, s, lp + row_q0 + j0);
        if (band) {
          band_run(query_band(run, g.kw * L, 1, L, vm, qr.plane, qr.rw, j0, g, st.band), g,
                   op + (row_q0 + j0) * g.D, st.band);
        } else {
          for (int64_t t = 0; t < L; ++t) attend(j0 + t, run + t, L);
        }
      }, [&](int64_t j0, int64_t count, const AxisWindow& window) {
        window_scores(q_row + j0 * qm.pixel, qm.pixel, count, st.keys.grouped(), window,
                      order, g, st.scores.data(), st.stride(g));
        for (int64_t t = 0; t < count; ++t) {
          const int64_t j = j0 + t;
          T* probs = st.scores.data() + t * st.stride(g);
          scale_in_place(probs, K2, s);
          if (rpb_head) add_bias(probs, rpb_head, qr.rw, axis_window(j, g.W, g.kw, g.dw), g);
          lp[row_q0 + j] = softmax_in_place(probs, K2);
          attend(j, probs, 1);
        }
      });
    });
  });
  return {out.to(query.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_fused_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
    double scale, const std::optional<at::Tensor>& grad_lse) {
  check_fused_backward_args(grad_out, query, key, value, rpb, out, lse, kernel_size, dilation,
                            grad_lse);
  const Geometry g(query, kernel_size, dilation);
  const at::Tensor q = as_compute_map(query), k = as_compute_map(key);
  const at::Tensor v = as_compute_map(value), go = as_compute_map(grad_out);
  const at::Tensor o = as_compute_map(out);
  const at::Tensor l = lse.to(q.scalar_type()).contiguous();
  const at::Tensor gl = is_given(grad_lse) ? grad_lse->to(q.scalar_type()).contiguous()
                                          : at::Tensor();
  const at::Tensor bias = is_given(rpb) ? as_compute(*rpb) : at::Tensor();
  at::Tensor grad_q = scratch_empty(q.sizes(), q.options());
  at::Tensor grad_k = scratch_empty(q.sizes(), q.options());
  at::Tensor grad_v = scratch_empty(q.sizes(), q.options());
  at::Tensor partial = at::zeros({g.planes * g.H, g.bias_bins()}, q.options());
  const ColumnOrder order(g.W, g.dw);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nat_mm_na2d_fused_backward_cpu", [&] {
    using T = scalar_t;
    const BackwardInputs<T> in(q, k, v, go, o, l, gl, bias, order, g, scale, grad_q, partial);
    const std::vector<int64_t> row_starts = window_starts(g.H, g.kh, g.dh);
    const std::vector<int64_t> col_starts = window_starts(g.W, g.kw, g.dw);
    // [row][C][col] copies of q and grad_out for key runs without a band kernel
    const at::Tensor q_t = in.band ? at::Tensor() : channels_by_column<T>(in.q, g, q.options());
    const at::Tensor go_t =
        in.band ? at::Tensor() : channels_by_column<T>(in.go, g, q.options());
    const T *qt = optional_data<T>(q_t), *got = optional_data<T>(go_t);
    T *gkp = grad_k.data_ptr<T>(), *gvp = grad_v.data_ptr<T>();
    const BackwardSegments seg(g);
    // The maps of the last `ring` query rows of a unit: every key row is summed as soon as
    // the last query row that sees it is done, while the rows it needs are still in cache.
    const int64_t ring = std::min<int64_t>(2 * g.kh - 1, (g.H + g.dh - 1) / g.dh);
    const int64_t map_row = g.window() * g.W;
    at::parallel_for(0, seg.units * seg.per_unit, seg.grain, [&](int64_t begin, int64_t end) {
      BackwardQueryRows<T> queries(in);
      InverseRows<T> inverse(g, row_starts, col_starts);
      std::vector<T> probs(ring * map_row), grad_logits(ring * map_row);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t plane = task / seg.per_unit / g.dh, residue = task / seg.per_unit % g.dh;
        const int64_t part = task % seg.per_unit;
        const int64_t sub_len = subgrid_length(g.H, g.dh, residue);
        const int64_t s0 = part * sub_len / seg.per_unit, s1 = (part + 1) * sub_len / seg.per_unit;
        if (s0 == s1) continue;
        auto slot = [&](int64_t row) { return (row / g.dh) % ring * map_row; };
        auto inverse_range = [&](int64_t sub) {
          return axis_inverse(sub * g.dh + residue, g.H, g.kh, g.dh);
        };
        // Query rows [first, last] see the key rows [s0, s1); rows outside [s0, s1) are halo:
        // their maps only (their grad_q and rpb bins belong to the neighbouring segment).
        int64_t key = s0;
        for (int64_t i = inverse_range(s0).first; i <= inverse_range(s1 - 1).last; ++i) {
          const int64_t row = i * g.dh + residue;
          queries.row(plane, row, probs.data() + slot(row), grad_logits.data() + slot(row),
                      s0 <= i && i < s1);
          for (; key < s1 && inverse_range(key).last <= i; ++key) {
            const int64_t kr = key * g.dh + residue, offset = (plane * g.H + kr) * g.W * g.D;
            inverse.row(plane, kr, [&](int64_t y) { return grad_logits.data() + slot(y); },
                        in.q, qt, gkp + offset);
            inverse.row(plane, kr, [&](int64_t y) { return probs.data() + slot(y); }, in.go,
                        got, gvp + offset);
          }
        }
      }
    });
  });
  const auto dtype = query.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype),
          reduce_bias_grad(partial, g).to(dtype)};
}

}  // namespace nat_mm
