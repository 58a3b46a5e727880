// Reuse of large CPU gradient buffers across backward calls (see grad_buffers.cpp).
#pragma once

#include <ATen/ATen.h>

namespace dtfast {
namespace dreamteacher {

// An uninitialised CPU tensor with the sizes and strides of `like`, backed by a buffer from an earlier call
// when one of that byte size is no longer referenced by anyone else; otherwise a fresh allocation, remembered
// for later calls when it is large. DTFAST_CPU_GRAD_CACHE=0 turns the reuse off.
at::Tensor reusable_empty_like(const at::Tensor& like);

// Drops every remembered buffer not in use (frees their memory).
void release_cached_grad_buffers();

}  // namespace dreamteacher
}  // namespace dtfast
