// AVX2 + FMA + F16C build of the CPU kernels (GCC on x86-64); elsewhere this unit reports "not available".
#include "dreamteacher_loss/cpu/kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <stdint.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DTFAST_CPU_ISA isa_avx2
#include "dreamteacher_loss/cpu/kernel_impl.h"
#pragma GCC pop_options

namespace dtfast {
namespace cpu {
namespace isa_avx2 {
bool available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace dtfast

#else
namespace dtfast {
namespace cpu {
namespace isa_avx2 {
bool available() { return false; }
void forward(ScalarKind kind, const ForwardArgs& args) { isa_default::forward(kind, args); }
void backward(ScalarKind kind, const BackwardArgs& args) { isa_default::backward(kind, args); }
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace dtfast
#endif
