// Host emulation of the CUDA kernels of csrc/dreamteacher_loss/cuda, for CI machines without a GPU.
//
// The kernels (kernels.cuh) and their launch plans and launch sequences (host.h) are compiled unchanged by the host
// compiler, with the CUDA built-ins they use defined below: a launch runs its blocks one after another, each block
// as blockDim.x CPU threads, __syncthreads as a barrier of the block, __shfl_xor_sync as an exchange through a
// barrier of the warp, __shared__ arrays as statics (one block runs at a time). The results are the kernels' own
// indexing and arithmetic on CPU tensors, compared against the float64 oracle by tests/test_ops_cuda_emulated.py.
// It does not check what only a GPU shows: the CUDA compiler's code, memory-model races, speed.
#include <torch/extension.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
inline thread_local Dim3 thread_idx;
inline Dim3 block_idx;
inline thread_local unsigned int shuffle_parity = 0;  // slot set of this thread's next warp shuffle

// Reusable barrier; a wait that is not met within the deadline throws (a thread left early, or a kernel bug):
// the test then fails with a message instead of hanging.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      throw std::runtime_error("emulated CUDA kernel: a barrier was not reached by all threads of its block/warp");
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Block {
  explicit Block(int threads) : sync(threads) {
    for (int w = 0; w * 32 < threads; ++w) {
      warps.push_back(std::make_unique<Barrier>(std::min(32, threads - w * 32)));
      slots.emplace_back(64, 0);
    }
  }
  Barrier sync;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<std::vector<uint64_t>> slots;
};
inline Block* block = nullptr;

}  // namespace emu

#define threadIdx ::emu::thread_idx
#define blockIdx ::emu::block_idx
#define __device__
#define __global__
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emu::block->sync.wait(); }

template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "emulated shuffle of at most 8 bytes");
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  // Two slot sets used alternately: one barrier per shuffle suffices, because a lane can only write the set of
  // shuffle n + 2 after every lane of its warp has reached shuffle n + 1, i.e. has read its value of shuffle n.
  const unsigned int parity = (emu::shuffle_parity ^= 1u);  // one counter for all value types
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  std::vector<uint64_t>& slots = emu::block->slots[warp];
  slots[parity * 32 + lane] = bits;
  emu::block->warps[warp]->wait();
  const uint64_t other = slots[parity * 32 + (lane ^ lane_mask)];
  T result;
  std::memcpy(&result, &other, sizeof(T));
  return result;
}

// Round-to-nearest multiply / subtract without contraction (built with -ffp-contract=off).
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }

#include "dreamteacher_loss/common.h"
#include "dreamteacher_loss/cuda/host.h"

namespace {

using dtfast::dreamteacher::Level;

// Runs kernel<<<blocks, threads>>>(args...) on CPU threads, one block at a time.
struct EmulatedLaunch {
  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), int64_t blocks, int threads, Args&&... args) const {
    TORCH_CHECK(threads > 0 && threads <= 1024, "emulated launch: bad block size ", threads);
    for (int64_t b = 0; b < blocks; ++b) {
      emu::Block state(threads);
      emu::block = &state;
      emu::block_idx.x = static_cast<unsigned int>(b);
      std::exception_ptr error;
      std::mutex error_mutex;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          emu::thread_idx.x = static_cast<unsigned int>(t);
          try {
            kernel(args...);
          } catch (...) {
            const std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
          }
        });
      }
      for (auto& thread : pool) thread.join();
      emu::block = nullptr;
      if (error) std::rethrow_exception(error);
    }
  }
};

std::vector<at::Tensor> forward(const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& teacher,
                                int64_t whiten, int64_t at_mode) {
  const std::vector<Level> levels =
      dtfast::dreamteacher::prepare_levels("emulated dreamteacher_loss_fwd", student, teacher, whiten, at_mode);
  auto [mse, at_dist, saved] = dtfast::dreamteacher::cuda_host::forward(EmulatedLaunch{}, levels, whiten, at_mode);
  std::vector<at::Tensor> out{mse, at_dist};
  out.insert(out.end(), saved.begin(), saved.end());
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_mse, const at::Tensor& grad_at,
                                 const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& teacher,
                                 const std::vector<at::Tensor>& saved, int64_t whiten, int64_t at_mode) {
  const char* op = "emulated dreamteacher_loss_bwd";
  const std::vector<Level> levels = dtfast::dreamteacher::prepare_levels(op, student, teacher, whiten, at_mode);
  dtfast::dreamteacher::check_backward_inputs(op, grad_mse, grad_at, saved, levels);
  return dtfast::dreamteacher::cuda_host::backward(EmulatedLaunch{}, grad_mse, grad_at, levels, saved);
}

// The backward launch plan of each level: [lanes, tiles, chunk, chunks, vectorised] (tests check its coverage).
std::vector<std::vector<int64_t>> backward_plan(const std::vector<at::Tensor>& student,
                                                const std::vector<at::Tensor>& teacher) {
  const std::vector<Level> levels = dtfast::dreamteacher::prepare_levels("backward_plan", student, teacher, 0, 0);
  std::vector<at::Tensor> grads = dtfast::dreamteacher::allocate_gradients(levels);
  std::vector<std::vector<int64_t>> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, levels[0].student.scalar_type(), "backward_plan", [&] {
    for (size_t first = 0; first < levels.size(); first += dtfast::dreamteacher::cuda_impl::kMaxLevels) {
      const int count = static_cast<int>(
          std::min<size_t>(dtfast::dreamteacher::cuda_impl::kMaxLevels, levels.size() - first));
      dtfast::dreamteacher::cuda_impl::Params P;
      dtfast::dreamteacher::cuda_host::fill_params<scalar_t>(P, levels, first, count, nullptr, nullptr, 0, &grads);
      for (int i = 0; i < count; ++i) {
        const auto& p = P.lv[i];
        out.push_back({p.bwd_lanes, p.bwd_tiles, p.bwd_chunk, p.bwd_chunks, p.vec_backward});
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "dreamteacher_loss_fwd through the emulated CUDA kernels: [mse, at, *saved]");
  m.def("backward", &backward, "dreamteacher_loss_bwd through the emulated CUDA kernel");
  m.def("backward_plan", &backward_plan, "per level [lanes, tiles, chunk, chunks, vectorised] of the backward");
}
