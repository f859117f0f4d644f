// Input validation shared by the CPU and CUDA implementations of every op.
//
// Each validator raises ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) with a message
// that names the op and the argument, e.g. "fsam_kernels::masked_perturb: expected grads[3] on cuda:0,
// got cpu". The kernels assume everything checked here.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

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

void validate_grad_norm(const char* op, at::TensorList params, at::TensorList grads, size_t n_adaptive,
                        bool allow_double);

// Shared by masked_perturb and masked_restore, on every device. `grads` may be empty (restore).
// saved_counts[i] is the number of elements saved for params[i]: its numel for a dense tensor, the
// number of its set mask bits for a masked one (the caller counts them once per mask, e.g. from
// mask_block_prefix); saved[i] must hold exactly that many. The kernels trust that the counts agree
// with bits / block_prefix (no device read here); if they do not, they never write outside saved[i].
void validate_perturb_restore(const char* op, at::TensorList params, at::TensorList grads, at::TensorList saved,
                              const at::Tensor& bits, const at::Tensor& block_prefix, at::IntArrayRef bit_offsets,
                              at::IntArrayRef saved_counts, size_t n_rho, size_t n_adaptive, const at::Tensor& norm,
                              bool allow_double);

}  // namespace fsam
