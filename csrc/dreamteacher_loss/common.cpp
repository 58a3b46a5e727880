#include "dreamteacher_loss/common.h"

#include <c10/util/Exception.h>

namespace dtfast {
namespace dreamteacher {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<Level> prepare_levels(const char* op, at::TensorList student, at::TensorList teacher, int64_t whiten,
                                  int64_t at_mode) {
  TORCH_CHECK(whiten == 0 || whiten == 1, op, ": whiten must be 0 (channel) or 1 (sample), got ", whiten);
  TORCH_CHECK(at_mode == 0 || at_mode == 1, op, ": at_mode must be 0 (paper) or 1 (code), got ", at_mode);
  TORCH_CHECK(!student.empty(), op, ": needs at least one level, got an empty student list");
  TORCH_CHECK(student.size() == teacher.size(), op, ": got ", student.size(), " student levels but ", teacher.size(),
              " teacher levels");
  std::vector<Level> levels;
  levels.reserve(student.size());
  const at::Tensor& first = student[0];
  for (size_t l = 0; l < student.size(); ++l) {
    const at::Tensor& s = student[l];
    const at::Tensor& g = teacher[l];
    TORCH_CHECK(s.defined() && g.defined(), op, ": level ", l, ": undefined tensor");
    TORCH_CHECK(s.dim() == 4, op, ": level ", l, ": student must be (B, C, H, W), got shape ", s.sizes());
    TORCH_CHECK(s.sizes() == g.sizes(), op, ": level ", l, ": student shape ", s.sizes(), " != teacher shape ",
                g.sizes());
    TORCH_CHECK(s.numel() > 0, op, ": level ", l, ": empty feature map of shape ", s.sizes());
    TORCH_CHECK(supported_dtype(s.scalar_type()), op, ": level ", l, ": unsupported dtype ", s.scalar_type(),
                " (float32, float64, bfloat16, float16)");
    TORCH_CHECK(s.scalar_type() == g.scalar_type(), op, ": level ", l, ": student dtype ", s.scalar_type(),
                " != teacher dtype ", g.scalar_type(), " (cast the teacher to the student's dtype)");
    TORCH_CHECK(s.scalar_type() == first.scalar_type(), op, ": level ", l, " has dtype ", s.scalar_type(),
                " but level 0 has ", first.scalar_type(), "; all levels must share one dtype");
    TORCH_CHECK(s.device() == first.device() && g.device() == first.device(), op, ": level ", l,
                ": student on ", s.device(), ", teacher on ", g.device(), ", level 0 on ", first.device(),
                "; all tensors must be on one device");
    Level lv;
    lv.channels_last = s.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    const auto format = lv.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    lv.student = s.contiguous(format);
    lv.teacher = g.contiguous(format);
    lv.batch = s.size(0);
    lv.channels = s.size(1);
    lv.pixels = s.size(2) * s.size(3);
    levels.push_back(std::move(lv));
  }
  return levels;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> allocate_forward_outputs(const std::vector<Level>& levels) {
  const auto options = levels[0].student.options().dtype(accumulate_type(levels[0].student.scalar_type()));
  const int64_t num_levels = static_cast<int64_t>(levels.size());
  std::vector<at::Tensor> saved;
  saved.reserve(levels.size());
  for (const Level& lv : levels) saved.push_back(at::empty({lv.batch, 3, lv.pixels}, options));
  return {at::empty({num_levels}, options), at::empty({num_levels}, options), std::move(saved)};
}

void check_backward_inputs(const char* op, const at::Tensor& grad_mse, const at::Tensor& grad_at,
                           at::TensorList saved, const std::vector<Level>& levels) {
  const int64_t num_levels = static_cast<int64_t>(levels.size());
  const at::Device device = levels[0].student.device();
  const auto acc = accumulate_type(levels[0].student.scalar_type());
  for (const auto& [name, grad] : {std::pair<const char*, const at::Tensor&>{"grad_mse", grad_mse},
                                   std::pair<const char*, const at::Tensor&>{"grad_at", grad_at}}) {
    TORCH_CHECK(grad.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == num_levels, op, ": ", name, " must have shape (", num_levels,
                ",), got ", grad.sizes());
    TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": ", name, " must be floating, got ",
                grad.scalar_type());
    TORCH_CHECK(grad.device() == device, op, ": ", name, " is on ", grad.device(), " but the features are on ",
                device);
  }
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == num_levels, op, ": got ", saved.size(),
              " saved statistics tensors for ", num_levels, " levels");
  for (int64_t l = 0; l < num_levels; ++l) {
    const Level& lv = levels[l];
    const at::Tensor& st = saved[l];
    TORCH_CHECK(st.defined() && st.dim() == 3 && st.size(0) == lv.batch && st.size(1) == 3 &&
                    st.size(2) == lv.pixels,
                op, ": level ", l, ": saved statistics must have shape (", lv.batch, ", 3, ", lv.pixels, "), got ",
                st.defined() ? st.sizes() : at::IntArrayRef{});
    TORCH_CHECK(st.scalar_type() == acc, op, ": level ", l, ": saved statistics must be ", acc, ", got ",
                st.scalar_type());
    TORCH_CHECK(st.device() == device, op, ": level ", l, ": saved statistics on ", st.device(),
                " but the features are on ", device);
    TORCH_CHECK(st.is_contiguous(), op, ": level ", l, ": saved statistics must be contiguous");
  }
}

std::vector<at::Tensor> allocate_gradients(const std::vector<Level>& levels) {
  std::vector<at::Tensor> grads;
  grads.reserve(levels.size());
  for (const Level& lv : levels) {
    grads.push_back(at::empty_like(
        lv.student, lv.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  return grads;
}

}  // namespace dreamteacher
}  // namespace dtfast
