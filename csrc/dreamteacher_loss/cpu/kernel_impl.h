// CPU kernels of the fused multi-scale DreamTeacher loss (DESIGN.md section 3), written once and compiled
// once per instruction set: kernel_<isa>.cpp defines DTFAST_CPU_ISA (a namespace name), sets the target
// and includes this file. Everything here lives in that namespace and uses no torch/std templates, so no
// inline function compiled for a wider instruction set can leak into the baseline path through the linker.
//
// Per level (s = student, g = teacher, both (B, C, N = H*W)):
//   forward : one sweep over each pixel column (NHWC whiten=channel: a second sweep over the column while it
//             is in L1) gives mean/rstd of g, q_s = sum_c s^2, q_g = sum_c g^2 and sum_c (s - W(g))^2;
//             whiten=sample reads g once more first (per-sample mean/var). Then O(B*N) per-sample work:
//             attention-map norms, the AT distance and the per-pixel AT coefficient saved for backward.
//   backward: one streaming pass, ds = (a + k * coef[p]) * s - a * rstd[p] * (g - mean[p]) with
//             a = grad_mse * 2 / (B*C*N), k = grad_at.
// Reductions: per-pixel sums in the accumulation type (float; double for double inputs), per-task and
// per-sample sums in double, combined in a fixed order: results do not depend on the thread count.
#include <stdint.h>

#include "dreamteacher_loss/cpu/kernel.h"

#ifndef DTFAST_CPU_ISA
#error "define DTFAST_CPU_ISA before including kernel_impl.h"
#endif

namespace dtfast {
namespace cpu {
namespace DTFAST_CPU_ISA {
namespace {

constexpr int64_t kTile = 512;        // whiten=sample, NCHW: pixels per column tile (accumulators on the stack)
constexpr int64_t kRowPixels = 4096;  // NCHW forward: pixels per task (whole rows up to 64x64)
constexpr int64_t kTaskElems = 1 << 16;  // target elements per parallel task

// ---------------------------------------------------------------- scalar conversions
inline float bits_to_f32(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, quiet NaN kept
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}
// IEEE half <-> float without F16C (branch-free, vectorisable; the FP16 library's formulation).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return bits_to_f32(result);
}
inline uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <typename T>
struct Io;
template <>
struct Io<float> {
  using acc = float;
  static inline float load(float v) { return v; }
  static inline float make(float v) { return v; }
};
template <>
struct Io<double> {
  using acc = double;
  static inline double load(double v) { return v; }
  static inline double make(double v) { return v; }
};
template <>
struct Io<bf16_t> {
  using acc = float;
  static inline float load(bf16_t v) { return bf16_to_f32(v.bits); }
  static inline bf16_t make(float v) { return bf16_t{f32_to_bf16(v)}; }
};
template <>
struct Io<f16_t> {
  using acc = float;
  static inline float load(f16_t v) { return f16_to_f32(v.bits); }
  static inline f16_t make(float v) { return f16_t{f32_to_f16(v)}; }
};

inline float rsqrt_eps(float var) { return 1.0f / __builtin_sqrtf(var + static_cast<float>(kWhitenEps)); }
inline double rsqrt_eps(double var) { return 1.0 / __builtin_sqrt(var + kWhitenEps); }

// Heap buffer without std templates (see the file comment).
template <typename V>
struct Buffer {
  explicit Buffer(int64_t n) : data(new V[n > 0 ? n : 1]()) {}
  ~Buffer() { delete[] data; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  V& operator[](int64_t i) { return data[i]; }
  V* data;
};

struct Task {
  int level;
  int64_t sample;
  int64_t begin, end;  // pixel range (forward), channel (NCHW) or pixel (NHWC) range (backward)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Forward tasks: pixel ranges of one sample (NCHW: whole column tiles); tasks of a sample are consecutive.
int64_t forward_tasks(const ForwardArgs& args, Task* out, int64_t* sample_first_task) {
  int64_t n = 0, sample = 0;
  for (int l = 0; l < args.num_levels; ++l) {
    const LevelArgs& lv = args.levels[l];
    int64_t step = kTaskElems / (lv.channels > 0 ? lv.channels : 1);
    if (!lv.channels_last) step = lv.pixels < kRowPixels ? lv.pixels : kRowPixels;
    if (step < 1) step = 1;
    for (int64_t b = 0; b < lv.batch; ++b, ++sample) {
      if (sample_first_task) sample_first_task[sample] = n;
      for (int64_t p = 0; p < lv.pixels; p += step) {
        if (out) out[n] = Task{l, b, p, p + step < lv.pixels ? p + step : lv.pixels};
        ++n;
      }
    }
  }
  if (sample_first_task) sample_first_task[sample] = n;
  return n;
}

// Backward tasks: contiguous memory blocks of one sample (NCHW: channel ranges, NHWC: pixel ranges).
int64_t backward_tasks(const BackwardArgs& args, Task* out) {
  int64_t n = 0;
  for (int l = 0; l < args.num_levels; ++l) {
    const LevelArgs& lv = args.levels[l];
    const int64_t inner = lv.channels_last ? lv.channels : lv.pixels;
    const int64_t outer = lv.channels_last ? lv.pixels : lv.channels;
    const int64_t step = kTaskElems / inner > 0 ? kTaskElems / inner : 1;
    for (int64_t b = 0; b < lv.batch; ++b) {
      for (int64_t i = 0; i < outer; i += step) {
        if (out) out[n] = Task{l, b, i, i + step < outer ? i + step : outer};
        ++n;
      }
    }
  }
  return n;
}

// ---------------------------------------------------------------- forward pieces
// Pointers below are already offset to sample b. Stats rows: mean = stats, rstd = stats + N, coef = stats + 2N
// (the coefficient row holds q_s until the per-sample phase turns it into the AT coefficient).

// whiten=channel, NCHW: pixels [p0, p0 + len) (len <= kRowPixels) in ONE sweep over the C rows, four rows at a
// time, with per-pixel accumulators in L1/L2: for a whole-row range the sweep reads the sample as one contiguous
// stream per tensor. (Narrow column tiles swept twice were 3x slower: 1000+ short strided runs defeat the
// prefetchers.) The error sum_c (s - (g - mean) * rstd)^2 follows from the sums by exact algebra, with
// d = g - g[c=0] (shifted sums keep the variance accurate) and delta = mean - g[c=0]:
//   sum_c s (g - mean) = S_sd - delta S_s,  sum_c (g - mean)^2 = S_dd - 2 delta S_d + C delta^2.
// Only the reported mse value depends on this combination (the gradient uses mean and rstd only).
template <typename T, typename A>
double channel_rows_nchw(const T* s, const T* g, int64_t C, int64_t N, int64_t p0, int64_t len, A* stats,
                         A* energy) {
  Buffer<A> buffer(7 * len);
  A* __restrict__ shift = buffer.data;
  A* __restrict__ sum_s = shift + len;
  A* __restrict__ sum_ss = sum_s + len;
  A* __restrict__ sum_d = sum_ss + len;
  A* __restrict__ sum_dd = sum_d + len;
  A* __restrict__ sum_sd = sum_dd + len;
  A* __restrict__ sum_gg = sum_sd + len;
  for (int64_t t = 0; t < len; ++t) shift[t] = Io<T>::load(g[p0 + t]);
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const T* __restrict__ s0 = s + c * N + p0;
    const T* __restrict__ s1 = s0 + N;
    const T* __restrict__ s2 = s1 + N;
    const T* __restrict__ s3 = s2 + N;
    const T* __restrict__ g0 = g + c * N + p0;
    const T* __restrict__ g1 = g0 + N;
    const T* __restrict__ g2 = g1 + N;
    const T* __restrict__ g3 = g2 + N;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const A x0 = Io<T>::load(s0[t]), x1 = Io<T>::load(s1[t]), x2 = Io<T>::load(s2[t]), x3 = Io<T>::load(s3[t]);
      const A y0 = Io<T>::load(g0[t]), y1 = Io<T>::load(g1[t]), y2 = Io<T>::load(g2[t]), y3 = Io<T>::load(g3[t]);
      const A d0 = y0 - shift[t], d1 = y1 - shift[t], d2 = y2 - shift[t], d3 = y3 - shift[t];
      sum_s[t] += (x0 + x1) + (x2 + x3);
      sum_ss[t] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3);
      sum_d[t] += (d0 + d1) + (d2 + d3);
      sum_dd[t] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      sum_sd[t] += (x0 * d0 + x1 * d1) + (x2 * d2 + x3 * d3);
      sum_gg[t] += (y0 * y0 + y1 * y1) + (y2 * y2 + y3 * y3);
    }
  }
  for (; c < C; ++c) {
    const T* __restrict__ sr = s + c * N + p0;
    const T* __restrict__ gr = g + c * N + p0;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const A sv = Io<T>::load(sr[t]);
      const A gv = Io<T>::load(gr[t]);
      const A d = gv - shift[t];
      sum_s[t] += sv;
      sum_ss[t] += sv * sv;
      sum_d[t] += d;
      sum_dd[t] += d * d;
      sum_sd[t] += sv * d;
      sum_gg[t] += gv * gv;
    }
  }
  const double count = static_cast<double>(C);
  double total = 0.0;
  for (int64_t t = 0; t < len; ++t) {
    const double md = static_cast<double>(sum_d[t]) / count;
    double var = static_cast<double>(sum_dd[t]) / count - md * md;
    var = var > 0.0 ? var : 0.0;
    const A rstd = rsqrt_eps(static_cast<A>(var));
    const double r = static_cast<double>(rstd);
    const double sum_sw = static_cast<double>(sum_sd[t]) - md * static_cast<double>(sum_s[t]);
    const double sum_ww = static_cast<double>(sum_dd[t]) - 2.0 * md * static_cast<double>(sum_d[t]) + count * md * md;
    const double err = static_cast<double>(sum_ss[t]) - 2.0 * r * sum_sw + r * r * sum_ww;
    total += err > 0.0 ? err : 0.0;
    stats[p0 + t] = static_cast<A>(static_cast<double>(shift[t]) + md);
    stats[N + p0 + t] = rstd;
    stats[2 * N + p0 + t] = sum_ss[t];
    energy[p0 + t] = sum_gg[t];
  }
  return total;
}

// whiten=channel, NHWC: pixel p's column is contiguous.
template <typename T, typename A>
double channel_pixel_nhwc(const T* __restrict__ sc, const T* __restrict__ gc, int64_t C, int64_t N, int64_t p,
                          A* stats, A* energy) {
  const A shift = Io<T>::load(gc[0]);
  A sum_d = 0, sum_dd = 0, sum_ss = 0, sum_gg = 0;
#pragma omp simd reduction(+ : sum_d, sum_dd, sum_ss, sum_gg)
  for (int64_t c = 0; c < C; ++c) {
    const A sv = Io<T>::load(sc[c]);
    const A gv = Io<T>::load(gc[c]);
    const A d = gv - shift;
    sum_d += d;
    sum_dd += d * d;
    sum_ss += sv * sv;
    sum_gg += gv * gv;
  }
  const A inv_c = A(1) / static_cast<A>(C);
  const A md = sum_d * inv_c;
  A var = sum_dd * inv_c - md * md;
  var = var > A(0) ? var : A(0);
  const A mean = shift + md, rstd = rsqrt_eps(var);
  A err = 0;
#pragma omp simd reduction(+ : err)
  for (int64_t c = 0; c < C; ++c) {
    const A e = Io<T>::load(sc[c]) - (Io<T>::load(gc[c]) - mean) * rstd;
    err += e * e;
  }
  stats[p] = mean;
  stats[N + p] = rstd;
  stats[2 * N + p] = sum_ss;
  energy[p] = sum_gg;
  return static_cast<double>(err);
}

// whiten=sample, first read of g: q_g per pixel and the task's sums of (g - shift) and (g - shift)^2.
template <typename T, typename A>
void sample_stats_range(const T* g, int64_t C, int64_t N, bool channels_last, int64_t p0, int64_t p1, A* energy,
                        double* sums) {
  const A shift = Io<T>::load(g[0]);
  double sum_d = 0.0, sum_dd = 0.0;
  if (channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* __restrict__ gc = g + p * C;
      A d1 = 0, d2 = 0, gg = 0;
#pragma omp simd reduction(+ : d1, d2, gg)
      for (int64_t c = 0; c < C; ++c) {
        const A gv = Io<T>::load(gc[c]);
        const A d = gv - shift;
        d1 += d;
        d2 += d * d;
        gg += gv * gv;
      }
      energy[p] = gg;
      sum_d += static_cast<double>(d1);
      sum_dd += static_cast<double>(d2);
    }
  } else {
    for (int64_t p0t = p0; p0t < p1; p0t += kTile) {
      const int64_t len = p1 - p0t < kTile ? p1 - p0t : kTile;
      A d1[kTile], d2[kTile], gg[kTile];
      for (int64_t t = 0; t < len; ++t) d1[t] = d2[t] = gg[t] = A(0);
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict__ gr = g + c * N + p0t;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const A gv = Io<T>::load(gr[t]);
          const A d = gv - shift;
          d1[t] += d;
          d2[t] += d * d;
          gg[t] += gv * gv;
        }
      }
      for (int64_t t = 0; t < len; ++t) {
        energy[p0t + t] = gg[t];
        sum_d += static_cast<double>(d1[t]);
        sum_dd += static_cast<double>(d2[t]);
      }
    }
  }
  sums[0] = sum_d;
  sums[1] = sum_dd;
}

// whiten=sample, second read: q_s per pixel and sum of (s - (g - mean) * rstd)^2 over the range.
template <typename T, typename A>
double sample_error_range(const T* s, const T* g, int64_t C, int64_t N, bool channels_last, int64_t p0, int64_t p1,
                          A mean, A rstd, A* stats) {
  double total = 0.0;
  if (channels_last) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* __restrict__ sc = s + p * C;
      const T* __restrict__ gc = g + p * C;
      A ss = 0, err = 0;
#pragma omp simd reduction(+ : ss, err)
      for (int64_t c = 0; c < C; ++c) {
        const A sv = Io<T>::load(sc[c]);
        const A e = sv - (Io<T>::load(gc[c]) - mean) * rstd;
        ss += sv * sv;
        err += e * e;
      }
      stats[p] = mean;
      stats[N + p] = rstd;
      stats[2 * N + p] = ss;
      total += static_cast<double>(err);
    }
  } else {
    for (int64_t p0t = p0; p0t < p1; p0t += kTile) {
      const int64_t len = p1 - p0t < kTile ? p1 - p0t : kTile;
      A ss[kTile], err[kTile];
      for (int64_t t = 0; t < len; ++t) ss[t] = err[t] = A(0);
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict__ sr = s + c * N + p0t;
        const T* __restrict__ gr = g + c * N + p0t;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const A sv = Io<T>::load(sr[t]);
          const A e = sv - (Io<T>::load(gr[t]) - mean) * rstd;
          ss[t] += sv * sv;
          err[t] += e * e;
        }
      }
      for (int64_t t = 0; t < len; ++t) {
        stats[p0t + t] = mean;
        stats[N + p0t + t] = rstd;
        stats[2 * N + p0t + t] = ss[t];
        total += static_cast<double>(err[t]);
      }
    }
  }
  return total;
}

// Per-sample attention-transfer term from q_s (in the coef row) and q_g; replaces q_s by the coefficient.
// qhat = q / max(||q||, eps); paper: AT_b = ||qhat_s - qhat_g||, code: AT_b = mean_p (qhat_s - qhat_g)^2.
// u = dAT_l/dqhat_s (AT_l = mean_b AT_b); dAT_l/dq_s = (u - qhat_s <qhat_s, u>) / ||q_s|| (u / eps if clamped).
template <typename A>
double attention_sample(A* coef, const A* energy, int64_t N, int64_t B, int at_mode) {
  double ns2 = 0.0, ng2 = 0.0;
  for (int64_t p = 0; p < N; ++p) {
    ns2 += static_cast<double>(coef[p]) * static_cast<double>(coef[p]);
    ng2 += static_cast<double>(energy[p]) * static_cast<double>(energy[p]);
  }
  const double ns = __builtin_sqrt(ns2), ng = __builtin_sqrt(ng2);
  const bool s_clamped = ns < kAttentionEps;
  const double inv_ns = 1.0 / (s_clamped ? kAttentionEps : ns);
  const double inv_ng = 1.0 / (ng < kAttentionEps ? kAttentionEps : ng);
  double dd = 0.0;
  for (int64_t p = 0; p < N; ++p) {
    const double d = static_cast<double>(coef[p]) * inv_ns - static_cast<double>(energy[p]) * inv_ng;
    dd += d * d;
  }
  double value, u_scale;  // u_p = u_scale * d_p
  if (at_mode == 0) {
    value = __builtin_sqrt(dd);
    u_scale = value > 0.0 ? 1.0 / (static_cast<double>(B) * value) : 0.0;
  } else {
    value = dd / static_cast<double>(N);
    u_scale = 2.0 / (static_cast<double>(B) * static_cast<double>(N));
  }
  double dot = 0.0;  // <qhat_s, u>
  if (!s_clamped) {
    for (int64_t p = 0; p < N; ++p) {
      const double qh = static_cast<double>(coef[p]) * inv_ns;
      dot += qh * u_scale * (qh - static_cast<double>(energy[p]) * inv_ng);
    }
  }
  for (int64_t p = 0; p < N; ++p) {
    const double qh = static_cast<double>(coef[p]) * inv_ns;
    const double u = u_scale * (qh - static_cast<double>(energy[p]) * inv_ng);
    const double dq = s_clamped ? u * inv_ns : (u - qh * dot) * inv_ns;
    coef[p] = static_cast<A>(2.0 * dq);
  }
  return value;
}

template <typename T>
void forward_impl(const ForwardArgs& args) {
  using A = typename Io<T>::acc;
  int64_t num_samples = 0;
  for (int l = 0; l < args.num_levels; ++l) num_samples += args.levels[l].batch;
  Buffer<int64_t> first_task(num_samples + 1);
  const int64_t num_tasks = forward_tasks(args, nullptr, nullptr);
  Buffer<Task> tasks(num_tasks);
  forward_tasks(args, tasks.data, first_task.data);
  Buffer<int64_t> sample_base(args.num_levels);  // global sample index of (level, 0)
  int64_t total = 0;
  for (int l = 0; l < args.num_levels; ++l) {
    sample_base[l] = total;
    total += args.levels[l].batch;
  }
  Buffer<double> partial(2 * num_tasks);
  Buffer<double> sample_moments(2 * num_samples);  // whiten=sample: mean, rstd per sample
  const bool sample_whiten = args.whiten == 1;

  if (sample_whiten) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(args.num_threads)
    for (int64_t i = 0; i < num_tasks; ++i) {
      const Task& tk = tasks[i];
      const LevelArgs& lv = args.levels[tk.level];
      const int64_t off = tk.sample * lv.channels * lv.pixels;
      sample_stats_range<T, A>(static_cast<const T*>(lv.teacher) + off, lv.channels, lv.pixels, lv.channels_last,
                               tk.begin, tk.end, static_cast<A*>(lv.teacher_energy) + tk.sample * lv.pixels,
                               &partial[2 * i]);
    }
    for (int l = 0; l < args.num_levels; ++l) {
      const LevelArgs& lv = args.levels[l];
      const double count = static_cast<double>(lv.channels * lv.pixels);
      for (int64_t b = 0; b < lv.batch; ++b) {
        const int64_t smp = sample_base[l] + b;
        double sum_d = 0.0, sum_dd = 0.0;
        for (int64_t i = first_task[smp]; i < first_task[smp + 1]; ++i) {
          sum_d += partial[2 * i];
          sum_dd += partial[2 * i + 1];
        }
        const double md = sum_d / count;
        double var = sum_dd / count - md * md;
        var = var > 0.0 ? var : 0.0;
        const T* g = static_cast<const T*>(lv.teacher) + b * lv.channels * lv.pixels;
        sample_moments[2 * smp] = static_cast<double>(Io<T>::load(g[0])) + md;
        sample_moments[2 * smp + 1] = 1.0 / __builtin_sqrt(var + kWhitenEps);
      }
    }
  }

#pragma omp parallel for schedule(dynamic, 1) num_threads(args.num_threads)
  for (int64_t i = 0; i < num_tasks; ++i) {
    const Task& tk = tasks[i];
    const LevelArgs& lv = args.levels[tk.level];
    const int64_t C = lv.channels, N = lv.pixels, off = tk.sample * C * N;
    const T* s = static_cast<const T*>(lv.student) + off;
    const T* g = static_cast<const T*>(lv.teacher) + off;
    A* stats = static_cast<A*>(lv.stats) + tk.sample * 3 * N;
    A* energy = static_cast<A*>(lv.teacher_energy) + tk.sample * N;
    double err = 0.0;
    if (sample_whiten) {
      const int64_t smp = sample_base[tk.level] + tk.sample;
      err = sample_error_range<T, A>(s, g, C, N, lv.channels_last, tk.begin, tk.end,
                                     static_cast<A>(sample_moments[2 * smp]),
                                     static_cast<A>(sample_moments[2 * smp + 1]), stats);
    } else if (lv.channels_last) {
      for (int64_t p = tk.begin; p < tk.end; ++p) {
        err += channel_pixel_nhwc<T, A>(s + p * C, g + p * C, C, N, p, stats, energy);
      }
    } else {
      err = channel_rows_nchw<T, A>(s, g, C, N, tk.begin, tk.end - tk.begin, stats, energy);
    }
    partial[2 * i] = err;
  }

  Buffer<double> at_sample(num_samples);
#pragma omp parallel for schedule(dynamic, 1) num_threads(args.num_threads)
  for (int64_t smp = 0; smp < num_samples; ++smp) {
    int l = 0;
    while (l + 1 < args.num_levels && sample_base[l + 1] <= smp) ++l;
    const LevelArgs& lv = args.levels[l];
    const int64_t b = smp - sample_base[l], N = lv.pixels;
    at_sample[smp] = attention_sample<A>(static_cast<A*>(lv.stats) + b * 3 * N + 2 * N,
                                         static_cast<const A*>(lv.teacher_energy) + b * N, N, lv.batch,
                                         args.at_mode);
  }

  for (int l = 0; l < args.num_levels; ++l) {
    const LevelArgs& lv = args.levels[l];
    double err = 0.0, at = 0.0;
    const int64_t s0 = sample_base[l];
    for (int64_t i = first_task[s0]; i < first_task[s0 + lv.batch]; ++i) err += partial[2 * i];
    for (int64_t b = 0; b < lv.batch; ++b) at += at_sample[s0 + b];
    args.mse[l] = err / static_cast<double>(lv.batch * lv.channels * lv.pixels);
    args.at[l] = at / static_cast<double>(lv.batch);
  }
}

template <typename T>
void backward_impl(const BackwardArgs& args) {
  using A = typename Io<T>::acc;
  const int64_t num_tasks = backward_tasks(args, nullptr);
  Buffer<Task> tasks(num_tasks);
  backward_tasks(args, tasks.data);
#pragma omp parallel for schedule(dynamic, 1) num_threads(args.num_threads)
  for (int64_t i = 0; i < num_tasks; ++i) {
    const Task& tk = tasks[i];
    const LevelArgs& lv = args.levels[tk.level];
    const int64_t C = lv.channels, N = lv.pixels, off = tk.sample * C * N;
    const T* __restrict__ s = static_cast<const T*>(lv.student) + off;
    const T* __restrict__ g = static_cast<const T*>(lv.teacher) + off;
    T* __restrict__ ds = static_cast<T*>(lv.grad_student) + off;
    const A* __restrict__ mean = static_cast<const A*>(lv.stats) + tk.sample * 3 * N;
    const A* __restrict__ rstd = mean + N;
    const A* __restrict__ coef = mean + 2 * N;
    const A a = static_cast<A>(args.grad_mse[tk.level] * 2.0 / static_cast<double>(lv.batch * C * N));
    const A k = static_cast<A>(args.grad_at[tk.level]);
    if (lv.channels_last) {
      for (int64_t p = tk.begin; p < tk.end; ++p) {
        const A scale_s = a + k * coef[p], scale_g = a * rstd[p], mu = mean[p];
        const T* __restrict__ sc = s + p * C;
        const T* __restrict__ gc = g + p * C;
        T* __restrict__ dc = ds + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          dc[c] = Io<T>::make(scale_s * Io<T>::load(sc[c]) - scale_g * (Io<T>::load(gc[c]) - mu));
        }
      }
    } else {
      for (int64_t c = tk.begin; c < tk.end; ++c) {
        const T* __restrict__ sr = s + c * N;
        const T* __restrict__ gr = g + c * N;
        T* __restrict__ dr = ds + c * N;
#pragma omp simd
        for (int64_t p = 0; p < N; ++p) {
          dr[p] = Io<T>::make((a + k * coef[p]) * Io<T>::load(sr[p]) - a * rstd[p] * (Io<T>::load(gr[p]) - mean[p]));
        }
      }
    }
  }
}

}  // namespace

void forward(ScalarKind kind, const ForwardArgs& args) {
  switch (kind) {
    case ScalarKind::kFloat: return forward_impl<float>(args);
    case ScalarKind::kDouble: return forward_impl<double>(args);
    case ScalarKind::kBFloat16: return forward_impl<bf16_t>(args);
    case ScalarKind::kHalf: return forward_impl<f16_t>(args);
  }
}

void backward(ScalarKind kind, const BackwardArgs& args) {
  switch (kind) {
    case ScalarKind::kFloat: return backward_impl<float>(args);
    case ScalarKind::kDouble: return backward_impl<double>(args);
    case ScalarKind::kBFloat16: return backward_impl<bf16_t>(args);
    case ScalarKind::kHalf: return backward_impl<f16_t>(args);
  }
}

}  // namespace DTFAST_CPU_ISA
}  // namespace cpu
}  // namespace dtfast
