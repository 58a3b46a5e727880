// CUDA implementation of dtfast::dreamteacher_loss_fwd / _bwd: kernels in kernels.cuh, launch plans and launch
// sequences in host.h (shared with the host emulation of tests/cuda_emulation), contract in ../common.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "dreamteacher_loss/common.h"
#include "dreamteacher_loss/cuda/host.h"

namespace dtfast {
namespace dreamteacher {
namespace {

// Launches on the current stream and checks the launch.
struct CudaLaunch {
  cudaStream_t stream;
  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), int64_t blocks, int threads, Args&&... args) const {
    if (blocks == 0) return;
    kernel<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda(const char* op, const std::vector<Level>& levels) {
  TORCH_CHECK(levels[0].student.is_cuda(), op, " (CUDA kernel): features are on ", levels[0].student.device());
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_cuda(at::TensorList student,
                                                                        at::TensorList teacher, int64_t whiten,
                                                                        int64_t at_mode) {
  const char* op = "dreamteacher_loss_fwd";
  const std::vector<Level> levels = prepare_levels(op, student, teacher, whiten, at_mode);
  check_cuda(op, levels);
  const c10::cuda::CUDAGuard guard(levels[0].student.device());
  return cuda_host::forward(CudaLaunch{at::cuda::getCurrentCUDAStream()}, levels, whiten, at_mode);
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_mse, const at::Tensor& grad_at, at::TensorList student,
                                      at::TensorList teacher, at::TensorList saved, int64_t whiten, int64_t at_mode) {
  const char* op = "dreamteacher_loss_bwd";
  const std::vector<Level> levels = prepare_levels(op, student, teacher, whiten, at_mode);
  check_cuda(op, levels);
  check_backward_inputs(op, grad_mse, grad_at, saved, levels);
  const c10::cuda::CUDAGuard guard(levels[0].student.device());
  return cuda_host::backward(CudaLaunch{at::cuda::getCurrentCUDAStream()}, grad_mse, grad_at, levels, saved);
}

}  // namespace
}  // namespace dreamteacher
}  // namespace dtfast

TORCH_LIBRARY_IMPL(dtfast, CUDA, m) {
  m.impl("dreamteacher_loss_fwd", TORCH_FN(dtfast::dreamteacher::forward_cuda));
  m.impl("dreamteacher_loss_bwd", TORCH_FN(dtfast::dreamteacher::backward_cuda));
}
