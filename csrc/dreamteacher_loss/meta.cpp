// Meta (fake-tensor) kernels of dtfast::dreamteacher_loss_fwd / _bwd: output shapes, dtypes and layouts only,
// symbolic-shape friendly, so torch.compile can trace through the ops. See common.h for the contract.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "dreamteacher_loss/common.h"

namespace dtfast {
namespace dreamteacher {
namespace {

void check_meta(const char* op, at::TensorList student, at::TensorList teacher, int64_t whiten, int64_t at_mode) {
  TORCH_CHECK(whiten == 0 || whiten == 1, op, ": whiten must be 0 (channel) or 1 (sample), got ", whiten);
  TORCH_CHECK(at_mode == 0 || at_mode == 1, op, ": at_mode must be 0 (paper) or 1 (code), got ", at_mode);
  TORCH_CHECK(!student.empty(), op, ": needs at least one level, got an empty student list");
  TORCH_CHECK(student.size() == teacher.size(), op, ": got ", student.size(), " student levels but ", teacher.size(),
              " teacher levels");
  for (size_t l = 0; l < student.size(); ++l) {
    TORCH_CHECK(student[l].dim() == 4, op, ": level ", l, ": student must be (B, C, H, W), got shape ",
                student[l].sym_sizes());
    TORCH_CHECK(student[l].sym_sizes() == teacher[l].sym_sizes(), op, ": level ", l, ": student shape ",
                student[l].sym_sizes(), " != teacher shape ", teacher[l].sym_sizes());
    TORCH_CHECK(student[l].scalar_type() == teacher[l].scalar_type() &&
                    student[l].scalar_type() == student[0].scalar_type(),
                op, ": level ", l, ": student/teacher dtypes ", student[l].scalar_type(), "/",
                teacher[l].scalar_type(), " (level 0: ", student[0].scalar_type(), "); all must match");
  }
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_meta(at::TensorList student,
                                                                        at::TensorList teacher, int64_t whiten,
                                                                        int64_t at_mode) {
  check_meta("dreamteacher_loss_fwd", student, teacher, whiten, at_mode);
  const auto options = student[0].options().dtype(accumulate_type(student[0].scalar_type()));
  std::vector<at::Tensor> saved;
  saved.reserve(student.size());
  for (const at::Tensor& s : student) {
    saved.push_back(at::empty_symint({s.sym_size(0), c10::SymInt(3), s.sym_size(2) * s.sym_size(3)}, options));
  }
  const int64_t num_levels = static_cast<int64_t>(student.size());
  return {at::empty({num_levels}, options), at::empty({num_levels}, options), std::move(saved)};
}

std::vector<at::Tensor> backward_meta(const at::Tensor& grad_mse, const at::Tensor& grad_at, at::TensorList student,
                                      at::TensorList teacher, at::TensorList saved, int64_t whiten, int64_t at_mode) {
  const char* op = "dreamteacher_loss_bwd";
  check_meta(op, student, teacher, whiten, at_mode);
  TORCH_CHECK(saved.size() == student.size(), op, ": got ", saved.size(), " saved statistics tensors for ",
              student.size(), " levels");
  TORCH_CHECK(grad_mse.dim() == 1 && grad_at.dim() == 1, op, ": grad_mse and grad_at must be 1-D");
  std::vector<at::Tensor> grads;
  grads.reserve(student.size());
  for (const at::Tensor& s : student) {
    const bool channels_last = s.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    grads.push_back(
        at::empty_like(s, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  return grads;
}

}  // namespace
}  // namespace dreamteacher
}  // namespace dtfast

TORCH_LIBRARY_IMPL(dtfast, Meta, m) {
  m.impl("dreamteacher_loss_fwd", TORCH_FN(dtfast::dreamteacher::forward_meta));
  m.impl("dreamteacher_loss_bwd", TORCH_FN(dtfast::dreamteacher::backward_meta));
}
