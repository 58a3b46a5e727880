// CPU implementation of dtfast::dreamteacher_loss_fwd / _bwd: torch glue around the per-instruction-set
// kernels of kernel_impl.h. The widest instruction set the CPU supports is used, capped at ATen's own choice (so
// ATEN_CPU_CAPABILITY=default|avx2 limits dtfast as it limits torch); DTFAST_CPU_ISA=default|avx2|avx512 forces
// one (tests run every variant this machine supports).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dreamteacher_loss/common.h"
#include "dreamteacher_loss/cpu/grad_buffers.h"
#include "dreamteacher_loss/cpu/kernel.h"

namespace dtfast {
namespace dreamteacher {
namespace {

using cpu::BackwardArgs;
using cpu::ForwardArgs;
using cpu::LevelArgs;
using cpu::ScalarKind;

struct Isa {
  const char* name;
  void (*forward)(ScalarKind, const ForwardArgs&);
  void (*backward)(ScalarKind, const BackwardArgs&);
};

Isa select_isa() {
  static const Isa kIsas[] = {
      {"avx512", cpu::isa_avx512::forward, cpu::isa_avx512::backward},
      {"avx2", cpu::isa_avx2::forward, cpu::isa_avx2::backward},
      {"default", cpu::isa_default::forward, cpu::isa_default::backward},
  };
  static const bool kAvailable[] = {cpu::isa_avx512::available(), cpu::isa_avx2::available(), true};
  const char* requested = std::getenv("DTFAST_CPU_ISA");
  if (requested != nullptr && requested[0] != '\0') {
    for (int i = 0; i < 3; ++i) {
      if (std::strcmp(requested, kIsas[i].name) == 0) {
        TORCH_CHECK(kAvailable[i], "DTFAST_CPU_ISA=", requested, ": this CPU (or build) does not support it");
        return kIsas[i];
      }
    }
    TORCH_CHECK(false, "DTFAST_CPU_ISA=", requested, ": expected one of default, avx2, avx512");
  }
  // ATen's capability (ATEN_CPU_CAPABILITY, else the CPU's; fixed at start-up): 2 AVX512, 1 AVX2, 0 anything
  // else; kIsas[i] needs 2 - i
  static const int aten = [] {
    const std::string name = at::get_cpu_capability();
    return name.find("AVX512") != std::string::npos ? 2 : name.find("AVX2") != std::string::npos ? 1 : 0;
  }();
  for (int i = 0; i < 3; ++i) {
    if (kAvailable[i] && aten >= 2 - i) return kIsas[i];
  }
  return kIsas[2];
}

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::kFloat;
    case at::kDouble: return ScalarKind::kDouble;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kHalf;
    default: TORCH_CHECK(false, "dreamteacher_loss (CPU): unsupported dtype ", t);
  }
}

void check_cpu(const char* op, const std::vector<Level>& levels) {
  TORCH_CHECK(levels[0].student.device().is_cpu(), op, " (CPU kernel): features are on ",
              levels[0].student.device());
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_cpu(at::TensorList student,
                                                                       at::TensorList teacher, int64_t whiten,
                                                                       int64_t at_mode) {
  const char* op = "dreamteacher_loss_fwd";
  const std::vector<Level> levels = prepare_levels(op, student, teacher, whiten, at_mode);
  check_cpu(op, levels);
  auto [mse, at_dist, saved] = allocate_forward_outputs(levels);
  const auto acc = mse.scalar_type();
  // Scratch: q_g = sum_c g^2 per pixel, one buffer for all levels.
  int64_t scratch_size = 0;
  for (const Level& lv : levels) scratch_size += lv.batch * lv.pixels;
  at::Tensor energy = at::empty({scratch_size}, mse.options());
  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  std::vector<LevelArgs> args(levels.size());
  int64_t offset = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level& lv = levels[l];
    args[l].student = lv.student.const_data_ptr();
    args[l].teacher = lv.teacher.const_data_ptr();
    args[l].batch = lv.batch;
    args[l].channels = lv.channels;
    args[l].pixels = lv.pixels;
    args[l].channels_last = lv.channels_last;
    args[l].stats = saved[l].data_ptr();
    args[l].teacher_energy = static_cast<char*>(energy.data_ptr()) + offset * elem;
    offset += lv.batch * lv.pixels;
  }
  std::vector<double> mse_values(levels.size()), at_values(levels.size());
  ForwardArgs fa;
  fa.levels = args.data();
  fa.num_levels = static_cast<int>(levels.size());
  fa.whiten = static_cast<int>(whiten);
  fa.at_mode = static_cast<int>(at_mode);
  fa.num_threads = at::get_num_threads();
  fa.mse = mse_values.data();
  fa.at = at_values.data();
  select_isa().forward(scalar_kind(levels[0].student.scalar_type()), fa);
  for (size_t l = 0; l < levels.size(); ++l) {
    if (acc == at::kDouble) {
      mse.data_ptr<double>()[l] = mse_values[l];
      at_dist.data_ptr<double>()[l] = at_values[l];
    } else {
      mse.data_ptr<float>()[l] = static_cast<float>(mse_values[l]);
      at_dist.data_ptr<float>()[l] = static_cast<float>(at_values[l]);
    }
  }
  return {mse, at_dist, saved};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_mse, const at::Tensor& grad_at, at::TensorList student,
                                     at::TensorList teacher, at::TensorList saved, int64_t whiten, int64_t at_mode) {
  const char* op = "dreamteacher_loss_bwd";
  const std::vector<Level> levels = prepare_levels(op, student, teacher, whiten, at_mode);
  check_cpu(op, levels);
  check_backward_inputs(op, grad_mse, grad_at, saved, levels);
  const at::Tensor gm = grad_mse.to(at::kDouble).contiguous();
  const at::Tensor ga = grad_at.to(at::kDouble).contiguous();
  std::vector<at::Tensor> grads;  // allocate_gradients' layout, through the buffer cache (grad_buffers.cpp)
  grads.reserve(levels.size());
  for (const Level& lv : levels) grads.push_back(reusable_empty_like(lv.student));
  std::vector<LevelArgs> args(levels.size());
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level& lv = levels[l];
    args[l].student = lv.student.const_data_ptr();
    args[l].teacher = lv.teacher.const_data_ptr();
    args[l].grad_student = grads[l].data_ptr();
    args[l].batch = lv.batch;
    args[l].channels = lv.channels;
    args[l].pixels = lv.pixels;
    args[l].channels_last = lv.channels_last;
    args[l].stats = const_cast<void*>(saved[l].const_data_ptr());
  }
  BackwardArgs ba;
  ba.levels = args.data();
  ba.num_levels = static_cast<int>(levels.size());
  ba.grad_mse = gm.const_data_ptr<double>();
  ba.grad_at = ga.const_data_ptr<double>();
  ba.num_threads = at::get_num_threads();
  select_isa().backward(scalar_kind(levels[0].student.scalar_type()), ba);
  return grads;
}

}  // namespace

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> names;
  if (cpu::isa_avx512::available()) names.emplace_back("avx512");
  if (cpu::isa_avx2::available()) names.emplace_back("avx2");
  names.emplace_back("default");
  return names;
}

std::string selected_cpu_isa() { return select_isa().name; }

}  // namespace dreamteacher
}  // namespace dtfast

TORCH_LIBRARY_IMPL(dtfast, CPU, m) {
  m.impl("dreamteacher_loss_fwd", TORCH_FN(dtfast::dreamteacher::forward_cpu));
  m.impl("dreamteacher_loss_bwd", TORCH_FN(dtfast::dreamteacher::backward_cpu));
}
