// Argument checking and layout handling shared by the CPU, CUDA and Meta implementations of
//   dtfast::dreamteacher_loss_fwd(Tensor[] student, Tensor[] teacher, int whiten, int at_mode)
//       -> (Tensor mse, Tensor at, Tensor[] saved)
//   dtfast::dreamteacher_loss_bwd(Tensor grad_mse, Tensor grad_at, Tensor[] student, Tensor[] teacher,
//                                 Tensor[] saved, int whiten, int at_mode) -> Tensor[]
//
// Contract (all backends, interchangeable saved statistics):
// - student[l], teacher[l]: (B_l, C_l, H_l, W_l), same shape, one dtype for all levels (float32, float64,
//   bfloat16, float16), one device. Levels may differ in every dimension.
// - Layout: a level is processed channels_last when the student's suggested memory format is channels_last,
//   NCHW otherwise; inputs not dense in that layout (and a teacher in the other layout) are copied once.
//   The gradient comes back in the layout the level was processed in, with the student's dtype.
// - mse, at: (L,) in the accumulation type (float32; float64 for float64 inputs).
// - saved[l]: (B_l, 3, H_l*W_l) in the accumulation type, contiguous: rows mean(g) and rstd(g) of the
//   teacher whitening (per pixel for whiten=0; the per-sample values repeated over pixels for whiten=1) and
//   the attention-transfer coefficient c = 2 dAT_l/dq_s, so that dAT_l/ds[b, c, p] = c[b, p] * s[b, c, p].
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dtfast {
namespace dreamteacher {

struct Level {
  at::Tensor student;  // dense in the processing layout
  at::Tensor teacher;  // same layout as student
  bool channels_last = false;
  int64_t batch = 0, channels = 0, pixels = 0;
};

// Validates modes, shapes, dtypes and devices (errors name the level, shapes and dtypes) and returns
// the levels in their processing layout.
std::vector<Level> prepare_levels(const char* op, at::TensorList student, at::TensorList teacher, int64_t whiten,
                                  int64_t at_mode);

// Accumulation / statistics dtype for an input dtype.
at::ScalarType accumulate_type(at::ScalarType input);

// Allocates the forward outputs (mse, at, saved) for prepared levels.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> allocate_forward_outputs(const std::vector<Level>& levels);

// Validates the backward's grad_mse / grad_at (shape (L,), floating, on the inputs' device) and saved statistics.
void check_backward_inputs(const char* op, const at::Tensor& grad_mse, const at::Tensor& grad_at,
                           at::TensorList saved, const std::vector<Level>& levels);

// Gradient buffers, one per level, in the level's processing layout.
std::vector<at::Tensor> allocate_gradients(const std::vector<Level>& levels);

}  // namespace dreamteacher
}  // namespace dtfast
