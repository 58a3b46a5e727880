// CUDA kernels of the fused multi-scale DreamTeacher loss; all levels of a call in each launch (up to
// kMaxLevels per launch; the host splits longer lists). Same contract and saved statistics as the CPU kernels
// (see ../common.h). Launches: forward 3 (whiten=channel) or 5 (whiten=sample), backward 1.
//   column_kernel    one pass over s and g per pixel column: per-pixel sums over C of s, s^2, (g-shift),
//                    (g-shift)^2, s*(g-shift), g^2 -> whitening mean/rstd, q_s, q_g and sum_c (s - W(g))^2
//                    (the last from the sums: exact algebra, one read of each map)
//   attention_kernel one block per sample: attention-map norms, AT distance, per-pixel AT coefficient
//   finalize_kernel  per-level mse and at from per-sample values
//   sample_sums_kernel / sample_moments_kernel (whiten=sample): per-sample mean and rstd of g first
//   backward_kernel  ds = (a + k * coef[p]) * s - a * rstd[p] * (g - mean[p]), one streaming pass: each thread
//                    keeps one vector position of the contiguous extent and walks the strided one, with the
//                    per-pixel coefficients in registers (NCHW) and all loads of an unrolled group issued first
// Reductions are fixed-shape trees over fixed partitions: results are deterministic (no atomics).
#pragma once

#include <ATen/AccumulateType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace dtfast {
namespace dreamteacher {
namespace cuda_impl {

constexpr int kMaxLevels = 8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kNhwcPixelsPerWarp = 4;    // column_kernel, channels_last: pixels per warp
constexpr int kSampleSumVectors = 8;     // sample_sums_kernel: vectors per thread
constexpr int kBackwardUnroll = 4;       // backward_kernel: rows whose loads are issued together
constexpr int kBackwardRounds = 2;       // backward_kernel: unrolled groups per thread (DTFAST_CUDA_BWD_ROUNDS: host.h)
constexpr double kWhitenEps = 1e-6;
constexpr double kAttentionEps = 1e-12;

// Elements per 16-byte vector, and pixels per thread in the NCHW column kernel (at most 4, to bound shared memory).
template <typename T>
constexpr int vec16() { return 16 / static_cast<int>(sizeof(T)); }
template <typename T>
constexpr int nchw_vec() { return vec16<T>() < 4 ? vec16<T>() : 4; }

struct LevelParams {
  const void* s;
  const void* g;
  void* ds;
  void* stats;   // (B, 3, N) accumulation type
  void* energy;  // (B, N) accumulation type: q_g
  int64_t batch, channels, pixels;
  int channels_last;
  int vec_column, vec_flat, vec_backward;  // whether 16-byte (NCHW column: nchw_vec) loads are legal
  int64_t sample_begin;                     // global index of the level's first sample
  int64_t column_begin, column_tiles;       // column_kernel: first block, blocks per sample
  int64_t sums_begin, sums_tiles;           // sample_sums_kernel: first block, blocks per sample
  int64_t backward_begin;                   // backward_kernel: first block
  int bwd_lanes;                            // backward_kernel: threads along the contiguous extent (power of 2)
  int64_t bwd_tiles;                        //   tiles of bwd_lanes vectors per sample along the contiguous extent
  int64_t bwd_chunk, bwd_chunks;            //   strided rows per block, blocks per sample and tile
};

struct Params {
  LevelParams lv[kMaxLevels];
  int count;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

// Level owning global index `x` among levels whose ranges start at begin(l) (ascending).
template <typename F>
__device__ __forceinline__ int find_level(const Params& P, int64_t x, F begin) {
  int l = 0;
  while (l + 1 < P.count && begin(P.lv[l + 1]) <= x) ++l;
  return l;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Deterministic block sum (fixed tree); every thread gets the total. `buf` holds kWarps doubles.
__device__ __forceinline__ double block_sum(double v, double* buf) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += buf[w];
  return total;
}

// Per-pixel statistics from the column sums (double). shift: the value subtracted from g in the sums.
struct ColumnSums {
  double s, ss, d, dd, sd, gg;
};
struct PixelResult {
  double mean, rstd, err;
};
__device__ __forceinline__ PixelResult pixel_result(const ColumnSums& a, double shift, int64_t C, bool sample_mode,
                                                    double sample_mean, double sample_rstd) {
  const double count = static_cast<double>(C);
  PixelResult r;
  if (sample_mode) {
    r.mean = sample_mean;
    r.rstd = sample_rstd;
  } else {
    const double md = a.d / count;
    const double var = fmax(a.dd / count - md * md, 0.0);
    r.mean = shift + md;
    r.rstd = 1.0 / sqrt(var + kWhitenEps);
  }
  const double delta = r.mean - shift;
  const double sum_sw = a.sd - delta * a.s;                            // sum_c s (g - mean)
  const double sum_ww = a.dd - 2.0 * delta * a.d + count * delta * delta;  // sum_c (g - mean)^2
  r.err = fmax(a.ss - 2.0 * r.rstd * sum_sw + r.rstd * r.rstd * sum_ww, 0.0);
  return r;
}

template <typename T, typename A>
__device__ __forceinline__ void store_pixel(const LevelParams& lv, int64_t b, int64_t p, const PixelResult& r,
                                            const ColumnSums& a) {
  const int64_t N = lv.pixels;
  A* stats = static_cast<A*>(lv.stats) + b * 3 * N;
  stats[p] = static_cast<A>(r.mean);
  stats[N + p] = static_cast<A>(r.rstd);
  stats[2 * N + p] = static_cast<A>(a.ss);
  static_cast<A*>(lv.energy)[b * N + p] = static_cast<A>(a.gg);
}

// NCHW: lanes run along pixels (V pixels per thread, coalesced rows), warps split the channels.
template <typename T, int V>
__device__ void column_nchw(const LevelParams& lv, int64_t b, int64_t tile, bool sample_mode, double smean,
                            double srstd, double* partial_err, unsigned char* smem) {
  using A = at::acc_type<T, true>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t C = lv.channels, N = lv.pixels;
  const T* s = static_cast<const T*>(lv.s) + b * C * N;
  const T* g = static_cast<const T*>(lv.g) + b * C * N;
  constexpr int kTilePixels = 32 * V;
  const int64_t p0 = tile * kTilePixels + lane * V;
  A acc[6][V];
#pragma unroll
  for (int k = 0; k < 6; ++k)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[k][v] = A(0);
  A shift[V];
  if (p0 < N) {  // with V > 1, N % V == 0: all V pixels are in range
#pragma unroll
    for (int v = 0; v < V; ++v) shift[v] = sample_mode ? static_cast<A>(smean) : static_cast<A>(g[p0 + v]);
#pragma unroll 4
    for (int64_t c = warp; c < C; c += kWarps) {
      const Vec<T, V> sv = load_vec<T, V>(s + c * N + p0);
      const Vec<T, V> gv = load_vec<T, V>(g + c * N + p0);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A x = static_cast<A>(sv.v[v]), y = static_cast<A>(gv.v[v]), d = y - shift[v];
        acc[0][v] += x;
        acc[1][v] += x * x;
        acc[2][v] += d;
        acc[3][v] += d * d;
        acc[4][v] += x * d;
        acc[5][v] += y * y;
      }
    }
  }
  A* red = reinterpret_cast<A*>(smem);  // [6][kWarps][kTilePixels]
#pragma unroll
  for (int k = 0; k < 6; ++k)
#pragma unroll
    for (int v = 0; v < V; ++v) red[(k * kWarps + warp) * kTilePixels + lane * V + v] = acc[k][v];
  __syncthreads();
  double err = 0.0;
  const int64_t p = tile * kTilePixels + threadIdx.x;
  if (threadIdx.x < kTilePixels && p < N) {
    double sums[6];
#pragma unroll
    for (int k = 0; k < 6; ++k) {
      double t = 0.0;
      for (int w = 0; w < kWarps; ++w) t += static_cast<double>(red[(k * kWarps + w) * kTilePixels + threadIdx.x]);
      sums[k] = t;
    }
    const ColumnSums a{sums[0], sums[1], sums[2], sums[3], sums[4], sums[5]};
    const A shift_p = sample_mode ? static_cast<A>(smean) : static_cast<A>(g[p]);  // as in the sums above
    const double sh = static_cast<double>(shift_p);
    const PixelResult r = pixel_result(a, sh, C, sample_mode, smean, srstd);
    store_pixel<T, A>(lv, b, p, r, a);
    err = r.err;
  }
  __syncthreads();  // red is reused by block_sum
  const double total = block_sum(err, reinterpret_cast<double*>(smem));
  if (threadIdx.x == 0) partial_err[blockIdx.x] = total;
}

// channels_last: one warp per pixel, lanes along the contiguous channels (V per lane).
template <typename T, int V>
__device__ void column_nhwc(const LevelParams& lv, int64_t b, int64_t tile, bool sample_mode, double smean,
                            double srstd, double* partial_err, unsigned char* smem) {
  using A = at::acc_type<T, true>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t C = lv.channels, N = lv.pixels;
  double err_warp = 0.0;
  for (int k = 0; k < kNhwcPixelsPerWarp; ++k) {
    const int64_t p = (tile * kWarps + warp) * kNhwcPixelsPerWarp + k;
    if (p >= N) break;
    const T* sc = static_cast<const T*>(lv.s) + (b * N + p) * C;
    const T* gc = static_cast<const T*>(lv.g) + (b * N + p) * C;
    const A shift = sample_mode ? static_cast<A>(smean) : static_cast<A>(gc[0]);
    A acc[6] = {A(0), A(0), A(0), A(0), A(0), A(0)};
#pragma unroll 2
    for (int64_t c = lane * V; c < C; c += 32 * V) {
      const Vec<T, V> sv = load_vec<T, V>(sc + c);
      const Vec<T, V> gv = load_vec<T, V>(gc + c);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A x = static_cast<A>(sv.v[v]), y = static_cast<A>(gv.v[v]), d = y - shift;
        acc[0] += x;
        acc[1] += x * x;
        acc[2] += d;
        acc[3] += d * d;
        acc[4] += x * d;
        acc[5] += y * y;
      }
    }
    const ColumnSums a{warp_sum(acc[0]), warp_sum(acc[1]), warp_sum(acc[2]),
                       warp_sum(acc[3]), warp_sum(acc[4]), warp_sum(acc[5])};
    const PixelResult r = pixel_result(a, static_cast<double>(shift), C, sample_mode, smean, srstd);
    if (lane == 0) store_pixel<T, A>(lv, b, p, r, a);
    err_warp += r.err;
  }
  const double total = block_sum(lane == 0 ? err_warp : 0.0, reinterpret_cast<double*>(smem));
  if (threadIdx.x == 0) partial_err[blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) column_kernel(Params P, int sample_mode, const double* moments,
                                                          double* partial_err) {
  using A = at::acc_type<T, true>;
  constexpr int kV = nchw_vec<T>();
  __shared__ __align__(16) unsigned char smem[6 * kWarps * 32 * kV * sizeof(A)];
  const int64_t block = blockIdx.x;
  const int l = find_level(P, block, [](const LevelParams& lv) { return lv.column_begin; });
  const LevelParams& lv = P.lv[l];
  const int64_t local = block - lv.column_begin;
  const int64_t b = local / lv.column_tiles, tile = local % lv.column_tiles;
  const double smean = sample_mode ? moments[2 * (lv.sample_begin + b)] : 0.0;
  const double srstd = sample_mode ? moments[2 * (lv.sample_begin + b) + 1] : 0.0;
  if (lv.channels_last) {
    if (lv.vec_column) column_nhwc<T, vec16<T>()>(lv, b, tile, sample_mode, smean, srstd, partial_err, smem);
    else column_nhwc<T, 1>(lv, b, tile, sample_mode, smean, srstd, partial_err, smem);
  } else {
    if (lv.vec_column) column_nchw<T, kV>(lv, b, tile, sample_mode, smean, srstd, partial_err, smem);
    else column_nchw<T, 1>(lv, b, tile, sample_mode, smean, srstd, partial_err, smem);
  }
}

// whiten=sample, first pass: per block, sums of (g - g[b, first]) and its square over a contiguous chunk.
template <typename T, int V>
__device__ void sample_sums(const LevelParams& lv, int64_t b, int64_t tile, double* partial, double* buf) {
  using A = at::acc_type<T, true>;
  const int64_t count = lv.channels * lv.pixels;
  const T* g = static_cast<const T*>(lv.g) + b * count;
  const A shift = static_cast<A>(g[0]);
  A d1 = 0, d2 = 0;
  const int64_t start = tile * static_cast<int64_t>(kThreads * V * kSampleSumVectors);
#pragma unroll
  for (int it = 0; it < kSampleSumVectors; ++it) {
    const int64_t e = start + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * V;
    if (e < count) {
      const Vec<T, V> gv = load_vec<T, V>(g + e);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const A d = static_cast<A>(gv.v[v]) - shift;
        d1 += d;
        d2 += d * d;
      }
    }
  }
  const double t1 = block_sum(static_cast<double>(d1), buf);
  const double t2 = block_sum(static_cast<double>(d2), buf);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = t1;
    partial[2 * blockIdx.x + 1] = t2;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_sums_kernel(Params P, double* partial) {
  __shared__ double buf[kWarps];
  const int64_t block = blockIdx.x;
  const int l = find_level(P, block, [](const LevelParams& lv) { return lv.sums_begin; });
  const LevelParams& lv = P.lv[l];
  const int64_t local = block - lv.sums_begin;
  if (lv.vec_flat) sample_sums<T, vec16<T>()>(lv, local / lv.sums_tiles, local % lv.sums_tiles, partial, buf);
  else sample_sums<T, 1>(lv, local / lv.sums_tiles, local % lv.sums_tiles, partial, buf);
}

// One warp per sample: mean and rstd of g over (C, H, W) from the chunk sums, in a fixed order.
template <typename T>
__global__ void sample_moments_kernel(Params P, const double* partial, double* moments) {
  const int64_t sample = blockIdx.x;
  const int l = find_level(P, sample, [](const LevelParams& lv) { return lv.sample_begin; });
  const LevelParams& lv = P.lv[l];
  const int64_t b = sample - lv.sample_begin;
  double d1 = 0.0, d2 = 0.0;
  for (int64_t i = threadIdx.x; i < lv.sums_tiles; i += 32) {
    const int64_t blk = lv.sums_begin + b * lv.sums_tiles + i;
    d1 += partial[2 * blk];
    d2 += partial[2 * blk + 1];
  }
  d1 = warp_sum(d1);
  d2 = warp_sum(d2);
  if (threadIdx.x == 0) {
    const double count = static_cast<double>(lv.channels * lv.pixels);
    const T* g = static_cast<const T*>(lv.g) + b * lv.channels * lv.pixels;
    const double md = d1 / count;
    const double var = fmax(d2 / count - md * md, 0.0);
    moments[2 * sample] = static_cast<double>(static_cast<at::acc_type<T, true>>(g[0])) + md;
    moments[2 * sample + 1] = 1.0 / sqrt(var + kWhitenEps);
  }
}

// One block per sample: attention transfer. coef row holds q_s on entry and 2 dAT_l/dq_s on exit.
template <typename A>
__global__ void __launch_bounds__(kThreads) attention_kernel(Params P, int at_mode, const double* partial_err,
                                                             double* err_sample, double* at_sample) {
  __shared__ double buf[kWarps];
  const int64_t sample = blockIdx.x;
  const int l = find_level(P, sample, [](const LevelParams& lv) { return lv.sample_begin; });
  const LevelParams& lv = P.lv[l];
  const int64_t b = sample - lv.sample_begin, N = lv.pixels;
  A* coef = static_cast<A*>(lv.stats) + b * 3 * N + 2 * N;
  const A* energy = static_cast<const A*>(lv.energy) + b * N;
  double ns2 = 0.0, ng2 = 0.0, err = 0.0;
  for (int64_t p = threadIdx.x; p < N; p += kThreads) {
    const double qs = static_cast<double>(coef[p]), qg = static_cast<double>(energy[p]);
    ns2 += qs * qs;
    ng2 += qg * qg;
  }
  for (int64_t i = threadIdx.x; i < lv.column_tiles; i += kThreads) {
    err += partial_err[lv.column_begin + b * lv.column_tiles + i];
  }
  ns2 = block_sum(ns2, buf);
  ng2 = block_sum(ng2, buf);
  err = block_sum(err, buf);
  const double ns = sqrt(ns2), ng = sqrt(ng2);
  const bool s_clamped = ns < kAttentionEps;
  const double inv_ns = 1.0 / (s_clamped ? kAttentionEps : ns);
  const double inv_ng = 1.0 / (ng < kAttentionEps ? kAttentionEps : ng);
  // __dmul_rn / __dsub_rn: no FMA contraction, so identical maps give an exactly zero difference.
  double dd = 0.0;
  for (int64_t p = threadIdx.x; p < N; p += kThreads) {
    const double d = __dsub_rn(__dmul_rn(static_cast<double>(coef[p]), inv_ns),
                               __dmul_rn(static_cast<double>(energy[p]), inv_ng));
    dd += d * d;
  }
  dd = block_sum(dd, buf);
  double value, u_scale;
  if (at_mode == 0) {
    value = sqrt(dd);
    u_scale = value > 0.0 ? 1.0 / (static_cast<double>(lv.batch) * value) : 0.0;
  } else {
    value = dd / static_cast<double>(N);
    u_scale = 2.0 / (static_cast<double>(lv.batch) * static_cast<double>(N));
  }
  double dot = 0.0;
  for (int64_t p = threadIdx.x; p < N; p += kThreads) {
    const double qh = __dmul_rn(static_cast<double>(coef[p]), inv_ns);
    dot += qh * u_scale * __dsub_rn(qh, __dmul_rn(static_cast<double>(energy[p]), inv_ng));
  }
  dot = s_clamped ? 0.0 : block_sum(dot, buf);
  for (int64_t p = threadIdx.x; p < N; p += kThreads) {
    const double qh = __dmul_rn(static_cast<double>(coef[p]), inv_ns);
    const double u = u_scale * __dsub_rn(qh, __dmul_rn(static_cast<double>(energy[p]), inv_ng));
    coef[p] = static_cast<A>(2.0 * (u - qh * dot) * inv_ns);
  }
  if (threadIdx.x == 0) {
    err_sample[sample] = err;
    at_sample[sample] = value;
  }
}

template <typename A>
__global__ void finalize_kernel(Params P, const double* err_sample, const double* at_sample, A* mse, A* at) {
  const int l = threadIdx.x;
  if (l >= P.count) return;
  const LevelParams& lv = P.lv[l];
  double err = 0.0, dist = 0.0;
  for (int64_t b = 0; b < lv.batch; ++b) {
    err += err_sample[lv.sample_begin + b];
    dist += at_sample[lv.sample_begin + b];
  }
  mse[l] = static_cast<A>(err / static_cast<double>(lv.batch * lv.channels * lv.pixels));
  at[l] = static_cast<A>(dist / static_cast<double>(lv.batch));
}

// One block: rows [o_lo, o_hi) of the strided extent (channels in NCHW, pixels in channels_last) at one tile of
// the contiguous extent, for one sample. A thread owns V contiguous elements (one 16-byte vector where aligned)
// and walks the rows kThreads / bwd_lanes apart; NCHW keeps its V pixels' coefficients in registers, channels_last
// reads one pixel's coefficients per row (shared by the lanes of the row, cached).
template <typename T, int V, bool CL>
__device__ __forceinline__ void backward_tile(const LevelParams& lv, int64_t local, double grad_mse,
                                              double grad_at) {
  using A = at::acc_type<T, true>;
  constexpr int U = kBackwardUnroll;
  const int64_t C = lv.channels, N = lv.pixels;
  const int64_t inner = CL ? C : N, outer = CL ? N : C;
  const int lanes = lv.bwd_lanes, rows = kThreads / lanes;
  const int lane = static_cast<int>(threadIdx.x) % lanes, row = static_cast<int>(threadIdx.x) / lanes;
  const int64_t per_sample = lv.bwd_tiles * lv.bwd_chunks;
  const int64_t b = local / per_sample, rem = local % per_sample;
  const int64_t chunk = rem / lv.bwd_tiles, tile = rem % lv.bwd_tiles;
  const int64_t x = (tile * lanes + lane) * V;  // first contiguous index of this thread (V | inner when V > 1)
  if (x >= inner) return;
  const int64_t o_lo = chunk * lv.bwd_chunk;
  const int64_t o_hi = o_lo + lv.bwd_chunk < outer ? o_lo + lv.bwd_chunk : outer;
  const int64_t base = b * C * N + x;
  const T* __restrict__ s = static_cast<const T*>(lv.s) + base;
  const T* __restrict__ g = static_cast<const T*>(lv.g) + base;
  T* __restrict__ ds = static_cast<T*>(lv.ds) + base;
  const A* __restrict__ st = static_cast<const A*>(lv.stats) + b * 3 * N;  // rows: mean, rstd, coef
  const A a = static_cast<A>(grad_mse * 2.0 / static_cast<double>(lv.batch * C * N));
  const A k = static_cast<A>(grad_at);
  // NCHW: per-pixel coefficients of this thread's V pixels, for all its rows
  A scale_s[CL ? 1 : V], scale_g[CL ? 1 : V], mean[CL ? 1 : V];
  if (!CL) {
#pragma unroll
    for (int v = 0; v < (CL ? 1 : V); ++v) {
      scale_s[v] = a + k * st[2 * N + x + v];
      scale_g[v] = a * st[N + x + v];
      mean[v] = st[x + v];
    }
  }
  for (int64_t o0 = o_lo + row; o0 < o_hi; o0 += int64_t{rows} * U) {
    Vec<T, V> sv[U], gv[U];
    A ps[U], pg[U], pm[U];  // channels_last: the coefficients of each row's pixel
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t o = o0 + int64_t{u} * rows;
      if (o < o_hi) {
        sv[u] = load_vec<T, V>(s + o * inner);
        gv[u] = load_vec<T, V>(g + o * inner);
        if (CL) {
          ps[u] = a + k * st[2 * N + o];
          pg[u] = a * st[N + o];
          pm[u] = st[o];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t o = o0 + int64_t{u} * rows;
      if (o < o_hi) {
        Vec<T, V> out;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const A cs = CL ? ps[u] : scale_s[CL ? 0 : v];
          const A cg = CL ? pg[u] : scale_g[CL ? 0 : v];
          const A cm = CL ? pm[u] : mean[CL ? 0 : v];
          out.v[v] = static_cast<T>(cs * static_cast<A>(sv[u].v[v]) - cg * (static_cast<A>(gv[u].v[v]) - cm));
        }
        *reinterpret_cast<Vec<T, V>*>(ds + o * inner) = out;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(Params P, const double* grad_mse,
                                                            const double* grad_at) {
  const int64_t block = blockIdx.x;
  const int l = find_level(P, block, [](const LevelParams& lv) { return lv.backward_begin; });
  const LevelParams& lv = P.lv[l];
  const int64_t local = block - lv.backward_begin;
  constexpr int kV = vec16<T>();
  if (lv.channels_last) {
    if (lv.vec_backward) backward_tile<T, kV, true>(lv, local, grad_mse[l], grad_at[l]);
    else backward_tile<T, 1, true>(lv, local, grad_mse[l], grad_at[l]);
  } else {
    if (lv.vec_backward) backward_tile<T, kV, false>(lv, local, grad_mse[l], grad_at[l]);
    else backward_tile<T, 1, false>(lv, local, grad_mse[l], grad_at[l]);
  }
}

}  // namespace cuda_impl
}  // namespace dreamteacher
}  // namespace dtfast
