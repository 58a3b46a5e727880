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

#include "dreamteacher_loss/cpu/kernel_scalar.h"  // inside this namespace on purpose

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

#include "dreamteacher_loss/cpu/kernel_forward.h"  // inside this namespace on purpose

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
