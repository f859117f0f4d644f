// Input validation shared by the CPU and CUDA implementations of every op.
//
// Each validator raises ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) with a message
// that names the op and the argument, e.g. "fsam_kernels::masked_perturb: expected grads[3] on cuda:0,
// got cpu". The kernels assume everything checked here.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include <cstdint>
#include <vector>

namespace fsam {

// Packed-mask geometry, mirrored from fsam_kernels/layout.py (MASK_ALIGN_BITS).
constexpr int64_t kMaskAlignBits = 512;
constexpr int64_t kMaskAlignBytes = kMaskAlignBits / 8;

// Whether scalar type `t` is one the kernels read or write (fp32, fp16, bf16; fp64 on the CPU only).
bool is_kernel_float(at::ScalarType t, bool allow_double);

// Returns the number of masked elements N (sum of numels).
int64_t validate_select_mask(const char* op, at::TensorList scores, at::IntArrayRef bit_offsets, int64_t mask_bytes,
                             int64_t k, bool allow_double);

// key_histogram: 0 < radix_bits <= 16, shift >= 0, shift + radix_bits <= 32, prefix >= 0.
void validate_key_histogram(const char* op, at::TensorList scores, int64_t prefix, int64_t shift, int64_t radix_bits,
                            bool allow_double);

// mask_from_threshold: as select_mask, plus 0 <= threshold < 2**31 and 0 <= quotas[i] <= numel(scores[i]).
void validate_mask_from_threshold(const char* op, at::TensorList scores, at::IntArrayRef bit_offsets,
                                  int64_t mask_bytes, int64_t threshold, at::IntArrayRef quotas, bool allow_double);

// select_nm_mask: as select_mask, plus 1 <= n < m <= 16, numel(scores[i]) a multiple of m, and support
// empty or one tensor per score, of its size and device.
void validate_select_nm_mask(const char* op, at::TensorList scores, at::TensorList support,
                             at::IntArrayRef bit_offsets, int64_t mask_bytes, int64_t n, int64_t m, bool allow_double);

void validate_fisher_accumulate(const char* op, at::TensorList accum, at::TensorList grads, bool allow_double);

void validate_mask_bits(const char* op, const at::Tensor& bits);

// Gradients are optional per parameter (a parameter without one is left out) and may be strided:
// the kernels read a contiguous copy of a non-contiguous gradient.
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// The gradients as contiguous tensors, undefined where a parameter has none; a strided gradient is
// copied (on its device's current stream), a contiguous one only referenced.
std::vector<at::Tensor> contiguous_grads(const OptionalTensors& grads);

void validate_grad_norm(const char* op, at::TensorList params, const OptionalTensors& grads, size_t n_adaptive,
                        bool allow_double);

// Shared by masked_perturb and masked_restore, on every device. `grads` is null for restore.
// The originals are compact, in one buffer per weight dtype: params[i] keeps its saved_counts[i]
// originals at saved[saved_slots[i]][saved_offsets[i] :][: saved_counts[i]]; saved_slots[i] == -1
// leaves params[i] alone (perturb requires a gradient exactly where the slot is not -1). A count is
// the tensor's numel when dense, the number of its set mask bits when masked (the caller counts them
// once per mask, e.g. from mask_block_prefix). Ranges inside one buffer must follow parameter order
// without overlapping, so parallel chunks never write the same element. The kernels trust that the
// counts agree with bits / block_prefix (no device read here); if they do not, they never write
// outside a tensor's range.
void validate_perturb_restore(const char* op, at::TensorList params, const OptionalTensors* grads, at::TensorList saved,
                              at::IntArrayRef saved_slots, at::IntArrayRef saved_offsets, at::IntArrayRef saved_counts,
                              const at::Tensor& bits, const at::Tensor& block_prefix, at::IntArrayRef bit_offsets,
                              size_t n_rho, size_t n_adaptive, const at::Tensor& norm, bool allow_double);

}  // namespace fsam
