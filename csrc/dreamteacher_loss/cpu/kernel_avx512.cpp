// AVX-512 (F, BW, VL, DQ; 512-bit vectors) build of the CPU kernels (GCC on x86-64); elsewhere this unit
// reports "not available".
#include "dreamteacher_loss/cpu/kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <stdint.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define DTFAST_CPU_ISA isa_avx512
#include "dreamteacher_loss/cpu/kernel_impl.h"
#pragma GCC pop_options

namespace dtfast {
namespace cpu {
namespace isa_avx512 {
bool available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace dtfast

#else
namespace dtfast {
namespace cpu {
namespace isa_avx512 {
bool available() { return false; }
void forward(ScalarKind kind, const ForwardArgs& args) { isa_default::forward(kind, args); }
void backward(ScalarKind kind, const BackwardArgs& args) { isa_default::backward(kind, args); }
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace dtfast
#endif
