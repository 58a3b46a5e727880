// Plain-C++ interface of the CPU DreamTeacher-loss kernels (no torch headers: the kernels are compiled
// once per instruction set, see kernel_impl.h, and must not pull in torch's inline functions).
#pragma once

#include <cstdint>

namespace dtfast {
namespace cpu {

enum class ScalarKind : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// 16-bit storage types; conversions live in kernel_impl.h (one copy per instruction set).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// One level, already validated by the torch glue. Memory layout: NCHW-contiguous, or NHWC
// (channels_last-contiguous) when channels_last is true; student, teacher and grad share the layout.
struct LevelArgs {
  const void* student = nullptr;  // (B, C, H, W), scalar type of the op
  const void* teacher = nullptr;  // same shape, type and layout as student
  void* grad_student = nullptr;   // backward only: written, same layout as student
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t pixels = 0;  // H * W
  bool channels_last = false;
  // (B, 3, H*W) in the accumulation type (float, double for double inputs): teacher whitening mean,
  // teacher whitening rstd (per pixel for whiten=channel, the per-sample value broadcast for
  // whiten=sample) and the attention-transfer coefficient c[b, p] = 2 * dAT/dq_s[b, p], so that
  // d(AT)/d(s[b, c, p]) = c[b, p] * s[b, c, p]. Written by forward, read by backward.
  void* stats = nullptr;
  void* teacher_energy = nullptr;  // forward only: (B, H*W) scratch in the accumulation type
};

struct ForwardArgs {
  const LevelArgs* levels = nullptr;
  int num_levels = 0;
  int whiten = 0;   // 0 channel, 1 sample
  int at_mode = 0;  // 0 paper, 1 code
  int num_threads = 1;
  double* mse = nullptr;  // [num_levels]
  double* at = nullptr;   // [num_levels]
};

struct BackwardArgs {
  const LevelArgs* levels = nullptr;
  int num_levels = 0;
  const double* grad_mse = nullptr;  // [num_levels]
  const double* grad_at = nullptr;   // [num_levels]
  int num_threads = 1;
};

constexpr double kWhitenEps = 1e-6;     // LayerNorm eps (biased variance)
constexpr double kAttentionEps = 1e-12;  // clamp of the attention-map norm

#define DTFAST_CPU_DECLARE_ISA(isa)                               \
  namespace isa {                                                 \
  bool available();                                               \
  void forward(ScalarKind kind, const ForwardArgs& args);         \
  void backward(ScalarKind kind, const BackwardArgs& args);       \
  }

DTFAST_CPU_DECLARE_ISA(isa_default)
DTFAST_CPU_DECLARE_ISA(isa_avx2)
DTFAST_CPU_DECLARE_ISA(isa_avx512)

#undef DTFAST_CPU_DECLARE_ISA

}  // namespace cpu
}  // namespace dtfast
