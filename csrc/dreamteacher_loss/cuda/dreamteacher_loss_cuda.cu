// CUDA implementation of dtfast::dreamteacher_loss_fwd / _bwd (kernels in kernels.cuh; contract in ../common.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dreamteacher_loss/common.h"
#include "dreamteacher_loss/cuda/kernels.cuh"

namespace dtfast {
namespace dreamteacher {
namespace {

using cuda_impl::kBackwardVectors;
using cuda_impl::kMaxLevels;
using cuda_impl::kNhwcPixelsPerWarp;
using cuda_impl::kSampleSumVectors;
using cuda_impl::kThreads;
using cuda_impl::kWarps;
using cuda_impl::Params;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_cuda(const char* op, const std::vector<Level>& levels) {
  TORCH_CHECK(levels[0].student.is_cuda(), op, " (CUDA kernel): features are on ", levels[0].student.device());
}

// Fills Params for levels [first, first + count) and returns the block counts of each launch.
struct Grid {
  int64_t column = 0, sums = 0, backward = 0, samples = 0;
};

template <typename T>
Grid fill_params(Params& P, const std::vector<Level>& levels, size_t first, int count,
                 const std::vector<at::Tensor>* saved, const at::Tensor* energy, int64_t energy_offset,
                 const std::vector<at::Tensor>* grads) {
  constexpr int kVec = cuda_impl::vec16<T>();
  constexpr int kNchwVec = cuda_impl::nchw_vec<T>();
  using A = at::acc_type<T, true>;
  Grid grid;
  P.count = count;
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
    const int64_t inner = lv.channels_last ? lv.channels : lv.pixels;
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
    p.backward_begin = grid.backward;
    grid.backward += ceil_div(lv.batch * lv.channels * lv.pixels,
                              int64_t{kThreads} * (p.vec_backward ? kVec : 1) * kBackwardVectors);
  }
  for (const int64_t blocks : {grid.column, grid.sums, grid.backward, grid.samples}) {
    TORCH_CHECK(blocks < (int64_t{1} << 31), "dreamteacher_loss (CUDA): too many blocks (", blocks, ")");
  }
  return grid;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_cuda(at::TensorList student,
                                                                        at::TensorList teacher, int64_t whiten,
                                                                        int64_t at_mode) {
  const char* op = "dreamteacher_loss_fwd";
  std::vector<Level> levels = prepare_levels(op, student, teacher, whiten, at_mode);
  check_cuda(op, levels);
  const c10::cuda::CUDAGuard guard(levels[0].student.device());
  // Not a structured binding: the dispatch lambda captures these (C++17 cannot capture structured bindings).
  auto outputs = allocate_forward_outputs(levels);
  at::Tensor mse = std::get<0>(outputs), at_dist = std::get<1>(outputs);
  std::vector<at::Tensor> saved = std::move(std::get<2>(outputs));
  int64_t energy_size = 0;
  for (const Level& lv : levels) energy_size += lv.batch * lv.pixels;
  at::Tensor energy = at::empty({energy_size}, mse.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
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
        cuda_impl::sample_sums_kernel<scalar_t><<<grid.sums, kThreads, 0, stream>>>(P, sums);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        cuda_impl::sample_moments_kernel<scalar_t><<<grid.samples, 32, 0, stream>>>(P, sums, moments);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      cuda_impl::column_kernel<scalar_t><<<grid.column, kThreads, 0, stream>>>(P, static_cast<int>(whiten), moments,
                                                                                partial_err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda_impl::attention_kernel<A><<<grid.samples, kThreads, 0, stream>>>(P, static_cast<int>(at_mode), partial_err,
                                                                             err_sample, at_sample);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda_impl::finalize_kernel<A><<<1, 32, 0, stream>>>(P, err_sample, at_sample, mse.data_ptr<A>() + first,
                                                          at_dist.data_ptr<A>() + first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mse, at_dist, saved};
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_mse, const at::Tensor& grad_at, at::TensorList student,
                                      at::TensorList teacher, at::TensorList saved, int64_t whiten, int64_t at_mode) {
  const char* op = "dreamteacher_loss_bwd";
  std::vector<Level> levels = prepare_levels(op, student, teacher, whiten, at_mode);
  check_cuda(op, levels);
  check_backward_inputs(op, grad_mse, grad_at, saved, levels);
  const c10::cuda::CUDAGuard guard(levels[0].student.device());
  const at::Tensor gm = grad_mse.to(at::kDouble).contiguous();  // on the device: no host synchronisation
  const at::Tensor ga = grad_at.to(at::kDouble).contiguous();
  std::vector<at::Tensor> grads = allocate_gradients(levels);
  const std::vector<at::Tensor> saved_list(saved.begin(), saved.end());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, levels[0].student.scalar_type(), "dreamteacher_loss_bwd",
                                  [&] {
    for (size_t first = 0; first < levels.size(); first += kMaxLevels) {
      const int count = static_cast<int>(std::min<size_t>(kMaxLevels, levels.size() - first));
      Params P;
      const Grid grid = fill_params<scalar_t>(P, levels, first, count, &saved_list, nullptr, 0, &grads);
      cuda_impl::backward_kernel<scalar_t><<<grid.backward, kThreads, 0, stream>>>(
          P, gm.const_data_ptr<double>() + first, ga.const_data_ptr<double>() + first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grads;
}

}  // namespace
}  // namespace dreamteacher
}  // namespace dtfast

TORCH_LIBRARY_IMPL(dtfast, CUDA, m) {
  m.impl("dreamteacher_loss_fwd", TORCH_FN(dtfast::dreamteacher::forward_cuda));
  m.impl("dreamteacher_loss_bwd", TORCH_FN(dtfast::dreamteacher::backward_cuda));
}
