// Baseline build of the CPU kernels (the compiler's default instruction set, e.g. SSE2 on x86-64).
#define DTFAST_CPU_ISA isa_default
#include "dreamteacher_loss/cpu/kernel_impl.h"

namespace dtfast {
namespace cpu {
namespace isa_default {
bool available() { return true; }
}  // namespace isa_default
}  // namespace cpu
}  // namespace dtfast
