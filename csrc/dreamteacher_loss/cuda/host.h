// Host side of the CUDA kernels of kernels.cuh: launch plans (Params, grid sizes) and the forward / backward
// sequences of launches. Written once against a launcher, so that the same code drives
//   - the CUDA build (dreamteacher_loss_cuda.cu: launches on the current stream), and
//   - the host emulation of tests/cuda_emulation (runs each block's threads on CPU threads, so CI checks the
//     kernels' indexing and arithmetic on a machine without a GPU).
// A launcher is called as launch(kernel, blocks, threads, args...) and must run kernel<<<blocks, threads>>>(args...).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "dreamteacher_loss/common.h"
#include "dreamteacher_loss/cuda/kernels.cuh"

namespace dtfast {
namespace dreamteacher {
namespace cuda_host {

using cuda_impl::kBackwardRounds;
using cuda_impl::kBackwardUnroll;
using cuda_impl::kMaxLevels;
using cuda_impl::kNhwcPixelsPerWarp;
using cuda_impl::kSampleSumVectors;
using cuda_impl::kThreads;
using cuda_impl::kWarps;
using cuda_impl::Params;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Unrolled groups of kBackwardUnroll rows that each backward_kernel thread walks (a block covers
// threads-along-the-strided-extent x kBackwardUnroll x this rows): kBackwardRounds, or DTFAST_CUDA_BWD_ROUNDS
// (1..64) to measure others (benchmarks/loss_bench.py --cuda-bwd-rounds). Read per call: a plan, not the kernels.
inline int backward_rounds() {
  const char* text = std::getenv("DTFAST_CUDA_BWD_ROUNDS");
  if (text == nullptr || text[0] == '\0') return kBackwardRounds;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  TORCH_CHECK(*end == '\0' && value >= 1 && value <= 64, "DTFAST_CUDA_BWD_ROUNDS='", text,
              "': expected an integer in 1..64 (unset: ", kBackwardRounds, ")");
  return static_cast<int>(value);
}

// Smallest power of two >= n, capped at kThreads.
inline int lanes_for(int64_t n) {
  int lanes = 1;
  while (lanes < kThreads && lanes < n) lanes *= 2;
  return lanes;
}

// Block counts of each launch of one Params.
struct Grid {
  int64_t column = 0, sums = 0, backward = 0, samples = 0;
};

// Fills Params for levels [first, first + count) and returns the block counts of each launch.
template <typename T>
Grid fill_params(Params& P, const std::vector<Level>& levels, size_t first, int count,
                 const std::vector<at::Tensor>* saved, const at::Tensor* energy, int64_t energy_offset,
                 const std::vector<at::Tensor>* grads) {
  constexpr int kVec = cuda_impl::vec16<T>();
  constexpr int kNchwVec = cuda_impl::nchw_vec<T>();
  using A = at::acc_type<T, true>;
  Grid grid;
  P.count = count;
  const int rounds = grads ? backward_rounds() : kBackwardRounds;
  for (int i = 0; i < count; ++i) {
    const Level& lv = levels[first + i];
    auto& p = P.lv[i];
    p.s = lv.student.const_data_ptr();
    p.g = lv.teacher.const_data_ptr();
    p.ds = grads ? (*grads)[first + i].data_ptr() : nullptr;
    p.stats = saved ? const_cast<void*>((*saved)[first + i].const_data_ptr()) : nullptr;
    p.energy = energy ? static_cast<A*>(energy->data_ptr()) + energy_offset : nullptr;
    if (energy) energy_offset += lv.batch * lv.pixels;
    p.batch = lv.batch;
    p.channels = lv.channels;
    p.pixels = lv.pixels;
    p.channels_last = lv.channels_last ? 1 : 0;
    const bool ptrs_aligned = aligned16(p.s) && aligned16(p.g) && (p.ds == nullptr || aligned16(p.ds));
    // contiguous extent (pixels in NCHW, channels in channels_last) and the strided one
    const int64_t inner = lv.channels_last ? lv.channels : lv.pixels;
    const int64_t outer = lv.channels_last ? lv.pixels : lv.channels;
    p.vec_column = lv.channels_last ? (ptrs_aligned && lv.channels % kVec == 0)
                                    : (ptrs_aligned && lv.pixels % kNchwVec == 0);
    p.vec_flat = ptrs_aligned && (lv.channels * lv.pixels) % kVec == 0;
    p.vec_backward = ptrs_aligned && inner % kVec == 0;
    p.sample_begin = grid.samples;
    grid.samples += lv.batch;
    p.column_tiles = lv.channels_last ? ceil_div(lv.pixels, kWarps * kNhwcPixelsPerWarp)
                                      : ceil_div(lv.pixels, 32 * (p.vec_column ? kNchwVec : 1));
    p.column_begin = grid.column;
    grid.column += lv.batch * p.column_tiles;
    p.sums_tiles = ceil_div(lv.channels * lv.pixels, int64_t{kThreads} * (p.vec_flat ? kVec : 1) * kSampleSumVectors);
    p.sums_begin = grid.sums;
    grid.sums += lv.batch * p.sums_tiles;
    // backward: lanes along the contiguous extent (one vector each), the other threads of the block along the
    // strided extent; a block covers bwd_chunk strided rows of one tile of the contiguous extent of one sample
    const int vec = p.vec_backward ? kVec : 1;
    p.bwd_lanes = lanes_for(ceil_div(inner, vec));
    p.bwd_tiles = ceil_div(inner, int64_t{p.bwd_lanes} * vec);
    p.bwd_chunk = int64_t{kThreads / p.bwd_lanes} * kBackwardUnroll * rounds;
    p.bwd_chunks = ceil_div(outer, p.bwd_chunk);
    p.backward_begin = grid.backward;
    grid.backward += lv.batch * p.bwd_chunks * p.bwd_tiles;
  }
  for (const int64_t blocks : {grid.column, grid.sums, grid.backward, grid.samples}) {
    TORCH_CHECK(blocks < (int64_t{1} << 31), "dreamteacher_loss (CUDA): too many blocks (", blocks, ")");
  }
  return grid;
}

// dreamteacher_loss_fwd on prepared levels (device checked and guarded by the caller).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward(const Launch& launch,
                                                                    const std::vector<Level>& levels, int64_t whiten,
                                                                    int64_t at_mode) {
  // Not a structured binding: the dispatch lambda captures these (C++17 cannot capture structured bindings).
  auto outputs = allocate_forward_outputs(levels);
  at::Tensor mse = std::get<0>(outputs), at_dist = std::get<1>(outputs);
  std::vector<at::Tensor> saved = std::move(std::get<2>(outputs));
  int64_t energy_size = 0;
  for (const Level& lv : levels) energy_size += lv.batch * lv.pixels;
  at::Tensor energy = at::empty({energy_size}, mse.options());
  const auto double_options = mse.options().dtype(at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, levels[0].student.scalar_type(), "dreamteacher_loss_fwd",
                                  [&] {
    using A = at::acc_type<scalar_t, true>;
    int64_t energy_offset = 0;
    for (size_t first = 0; first < levels.size(); first += kMaxLevels) {
      const int count = static_cast<int>(std::min<size_t>(kMaxLevels, levels.size() - first));
      Params P;
      const Grid grid = fill_params<scalar_t>(P, levels, first, count, &saved, &energy, energy_offset, nullptr);
      for (int i = 0; i < count; ++i) energy_offset += levels[first + i].batch * levels[first + i].pixels;
      // Workspace (double): moments[2*samples], sums[2*sums blocks], partial_err[column blocks], err/at per sample.
      at::Tensor work = at::empty({2 * grid.samples + 2 * grid.sums + grid.column + 2 * grid.samples}, double_options);
      double* moments = work.data_ptr<double>();
      double* sums = moments + 2 * grid.samples;
      double* partial_err = sums + 2 * grid.sums;
      double* err_sample = partial_err + grid.column;
      double* at_sample = err_sample + grid.samples;
      if (whiten == 1) {
        launch(cuda_impl::sample_sums_kernel<scalar_t>, grid.sums, kThreads, P, sums);
        launch(cuda_impl::sample_moments_kernel<scalar_t>, grid.samples, 32, P, sums, moments);
      }
      launch(cuda_impl::column_kernel<scalar_t>, grid.column, kThreads, P, static_cast<int>(whiten), moments,
             partial_err);
      launch(cuda_impl::attention_kernel<A>, grid.samples, kThreads, P, static_cast<int>(at_mode), partial_err,
             err_sample, at_sample);
      launch(cuda_impl::finalize_kernel<A>, int64_t{1}, 32, P, err_sample, at_sample, mse.data_ptr<A>() + first,
             at_dist.data_ptr<A>() + first);
    }
  });
  return {mse, at_dist, saved};
}

// dreamteacher_loss_bwd on prepared levels (inputs checked, device guarded by the caller).
template <typename Launch>
std::vector<at::Tensor> backward(const Launch& launch, const at::Tensor& grad_mse, const at::Tensor& grad_at,
                                 const std::vector<Level>& levels, at::TensorList saved) {
  const at::Tensor gm = grad_mse.to(at::kDouble).contiguous();  // on the device: no host synchronisation
  const at::Tensor ga = grad_at.to(at::kDouble).contiguous();
  std::vector<at::Tensor> grads = allocate_gradients(levels);
  const std::vector<at::Tensor> saved_list(saved.begin(), saved.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, levels[0].student.scalar_type(), "dreamteacher_loss_bwd",
                                  [&] {
    for (size_t first = 0; first < levels.size(); first += kMaxLevels) {
      const int count = static_cast<int>(std::min<size_t>(kMaxLevels, levels.size() - first));
      Params P;
      const Grid grid = fill_params<scalar_t>(P, levels, first, count, &saved_list, nullptr, 0, &grads);
      launch(cuda_impl::backward_kernel<scalar_t>, grid.backward, kThreads, P, gm.const_data_ptr<double>() + first,
             ga.const_data_ptr<double>() + first);
    }
  });
  return grads;
}

}  // namespace cuda_host
}  // namespace dreamteacher
}  // namespace dtfast
