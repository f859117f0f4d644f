#include "checks.h"

#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace fsam {

bool is_kernel_float(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (allow_double && t == at::kDouble);
}

namespace {

std::string dtypes_expected(bool allow_double) {
  return allow_double ? "float32, float16, bfloat16 or float64" : "float32, float16 or bfloat16";
}

void check_on(const char* op, const char* arg, int64_t i, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", arg, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(t.device() == dev, op, ": expected ", arg, "[", i, "] on ", dev, ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", arg, "[", i, "] to be contiguous");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": expected ", arg, "[", i, "] to be a dense (strided) tensor");
}

// A gradient: like check_on, but any strides (the kernels read a contiguous copy when needed).
void check_grad(const char* op, int64_t i, const at::Tensor& g, const at::Tensor& param, bool allow_double) {
  TORCH_CHECK_VALUE(g.device() == param.device(), op, ": expected grads[", i, "] on ", param.device(), ", got ",
                    g.device());
  TORCH_CHECK_VALUE(g.layout() == at::kStrided, op, ": expected grads[", i, "] to be a dense (strided) tensor");
  TORCH_CHECK_TYPE(is_kernel_float(g.scalar_type(), allow_double), op, ": expected grads[", i, "] of dtype ",
                   dtypes_expected(allow_double), ", got ", g.scalar_type());
  TORCH_CHECK_VALUE(param.numel() == g.numel(), op, ": grads[", i, "] has ", g.numel(), " elements, params[", i,
                    "] has ", param.numel());
}

void check_float(const char* op, const char* arg, int64_t i, const at::Tensor& t, bool allow_double) {
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type(), allow_double), op, ": expected ", arg, "[", i, "] of dtype ",
                   dtypes_expected(allow_double), ", got ", t.scalar_type());
}

void check_offsets(const char* op, at::IntArrayRef bit_offsets, at::TensorList tensors, int64_t mask_bits,
                   bool allow_dense) {
  TORCH_CHECK_VALUE(bit_offsets.size() == tensors.size(), op, ": expected one bit offset per tensor (",
                    tensors.size(), "), got ", bit_offsets.size());
  // Each masked tensor owns [o, o + numel) and the next one starts at the next 512-bit boundary or
  // later (fsam_kernels/layout.py): ranges in increasing order, never overlapping, never sharing a block.
  int64_t next_free = 0;  // align_up(end of the previous masked tensor, kMaskAlignBits)
  int64_t prev = -1;      // index of the previous masked tensor
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t o = bit_offsets[i];
    if (allow_dense && o == -1) continue;
    TORCH_CHECK_VALUE(o >= 0 && o % kMaskAlignBits == 0, op, ": expected bit_offsets[", i,
                      "] to be a non-negative multiple of ", kMaskAlignBits, allow_dense ? " (or -1 for a dense tensor)" : "",
                      ", got ", o);
    TORCH_CHECK_VALUE(o >= next_free, op, ": expected bit_offsets[", i, "] >= ", next_free, " (bit_offsets[", prev,
                      "] + numel rounded up to ", kMaskAlignBits,
                      " bits): masked tensors must own increasing, non-overlapping bit ranges, got ", o);
    TORCH_CHECK_VALUE(o + tensors[i].numel() <= mask_bits, op, ": bit_offsets[", i, "] + numel = ",
                      o + tensors[i].numel(), " exceeds the mask's ", mask_bits, " bits");
    next_free = (o + tensors[i].numel() + kMaskAlignBits - 1) / kMaskAlignBits * kMaskAlignBits;
    prev = static_cast<int64_t>(i);
  }
}

}  // namespace

void validate_fisher_accumulate(const char* op, at::TensorList accum, at::TensorList grads, bool allow_double) {
  TORCH_CHECK_VALUE(accum.size() == grads.size(), op, ": expected as many grads as accumulators, got ", grads.size(),
                    " and ", accum.size());
  if (accum.empty()) return;
  const at::Device dev = accum[0].device();
  for (size_t i = 0; i < accum.size(); ++i) {
    check_on(op, "accum", i, accum[i], dev);
    check_on(op, "grads", i, grads[i], dev);
    TORCH_CHECK_TYPE(accum[i].scalar_type() == at::kFloat, op, ": expected accum[", i, "] of dtype float32, got ",
                     accum[i].scalar_type());
    check_float(op, "grads", i, grads[i], allow_double);
    TORCH_CHECK_VALUE(accum[i].numel() == grads[i].numel(), op, ": grads[", i, "] has ", grads[i].numel(),
                      " elements, accum[", i, "] has ", accum[i].numel());
  }
}

int64_t validate_select_mask(const char* op, at::TensorList scores, at::IntArrayRef bit_offsets, int64_t mask_bytes,
                             int64_t k, bool allow_double) {
  TORCH_CHECK_VALUE(mask_bytes >= 0 && mask_bytes % kMaskAlignBytes == 0, op, ": expected mask_bytes to be a multiple of ",
                    kMaskAlignBytes, ", got ", mask_bytes);
  int64_t n = 0;
  if (!scores.empty()) {
    const at::Device dev = scores[0].device();
    for (size_t i = 0; i < scores.size(); ++i) {
      check_on(op, "scores", i, scores[i], dev);
      check_float(op, "scores", i, scores[i], allow_double);
      n += scores[i].numel();
    }
  }
  check_offsets(op, bit_offsets, scores, mask_bytes * 8, /*allow_dense=*/false);
  TORCH_CHECK_VALUE(k >= 0 && k <= n, op, ": expected 0 <= k <= ", n, ", got k=", k);
  return n;
}

void validate_key_histogram(const char* op, at::TensorList scores, int64_t prefix, int64_t shift, int64_t radix_bits,
                            bool allow_double) {
  TORCH_CHECK_VALUE(0 < radix_bits && radix_bits <= 16 && 0 <= shift && shift + radix_bits <= 32, op,
                    ": expected 0 < radix_bits <= 16 and 0 <= shift <= 32 - radix_bits, got shift=", shift,
                    ", radix_bits=", radix_bits);
  TORCH_CHECK_VALUE(prefix >= 0, op, ": expected prefix >= 0, got ", prefix);
  TORCH_CHECK_VALUE(!scores.empty(), op, ": expected at least one scores tensor");
  const at::Device dev = scores[0].device();
  for (size_t i = 0; i < scores.size(); ++i) {
    check_on(op, "scores", i, scores[i], dev);
    check_float(op, "scores", i, scores[i], allow_double);
  }
}

void validate_mask_from_threshold(const char* op, at::TensorList scores, at::IntArrayRef bit_offsets,
                                  int64_t mask_bytes, int64_t threshold, at::IntArrayRef quotas, bool allow_double) {
  TORCH_CHECK_VALUE(!scores.empty(), op, ": expected at least one scores tensor");
  validate_select_mask(op, scores, bit_offsets, mask_bytes, /*k=*/0, allow_double);
  TORCH_CHECK_VALUE(0 <= threshold && threshold <= INT32_MAX, op, ": expected a threshold key in [0, 2**31), got ",
                    threshold);
  TORCH_CHECK_VALUE(quotas.size() == scores.size(), op, ": expected one quota per scores tensor (", scores.size(),
                    "), got ", quotas.size());
  for (size_t i = 0; i < quotas.size(); ++i) {
    TORCH_CHECK_VALUE(0 <= quotas[i] && quotas[i] <= scores[i].numel(), op, ": expected quotas[", i, "] in [0, ",
                      scores[i].numel(), "], got ", quotas[i]);
  }
}

void validate_select_nm_mask(const char* op, at::TensorList scores, at::TensorList support,
                             at::IntArrayRef bit_offsets, int64_t mask_bytes, int64_t n, int64_t m, bool allow_double) {
  TORCH_CHECK_VALUE(1 <= n && n < m && m <= 16, op, ": expected 1 <= n < m <= 16, got n=", n, ", m=", m);
  validate_select_mask(op, scores, bit_offsets, mask_bytes, /*k=*/0, allow_double);
  TORCH_CHECK_VALUE(support.empty() || support.size() == scores.size(), op,
                    ": expected support to be empty or hold one tensor per score (", scores.size(), "), got ",
                    support.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    TORCH_CHECK_VALUE(scores[i].numel() % m == 0, op, ": expected scores[", i, "] to have a multiple of m=", m,
                      " elements, got ", scores[i].numel());
    if (support.empty()) continue;
    const at::Tensor& s = support[i];
    TORCH_CHECK_VALUE(s.defined() && s.device() == scores[i].device(), op, ": expected support[", i, "] on ",
                      scores[i].device());
    TORCH_CHECK_VALUE(s.is_contiguous() && s.layout() == at::kStrided, op, ": expected support[", i,
                      "] to be a contiguous dense tensor");
    TORCH_CHECK_TYPE(is_kernel_float(s.scalar_type(), allow_double), op, ": expected support[", i,
                     "] of a floating-point dtype, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.numel() == scores[i].numel(), op, ": support[", i, "] has ", s.numel(),
                      " elements, scores[", i, "] has ", scores[i].numel());
  }
}

void validate_mask_bits(const char* op, const at::Tensor& bits) {
  TORCH_CHECK_VALUE(bits.defined(), op, ": bits is undefined");
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, op, ": expected bits of dtype uint8, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.is_contiguous(), op, ": expected bits to be a contiguous 1-D tensor, got shape ",
                    bits.sizes());
  TORCH_CHECK_VALUE(bits.numel() % kMaskAlignBytes == 0, op, ": expected bits to hold a multiple of ", kMaskAlignBytes,
                    " bytes, got ", bits.numel());
}

std::vector<at::Tensor> contiguous_grads(const OptionalTensors& grads) {
  std::vector<at::Tensor> out(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    std::optional<at::Tensor> g = grads.get(i);
    if (g.has_value() && g->defined()) out[i] = g->is_contiguous() ? std::move(*g) : g->contiguous();
  }
  return out;
}

void validate_grad_norm(const char* op, at::TensorList params, const OptionalTensors& grads, size_t n_adaptive,
                        bool allow_double) {
  TORCH_CHECK_VALUE(params.size() == grads.size() && params.size() == n_adaptive, op,
                    ": expected params, grads and adaptive of the same length, got ", params.size(), ", ", grads.size(),
                    " and ", n_adaptive);
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    check_on(op, "params", i, params[i], dev);
    check_float(op, "params", i, params[i], allow_double);
    const std::optional<at::Tensor> g = grads.get(i);
    if (g.has_value() && g->defined()) check_grad(op, i, *g, params[i], allow_double);
  }
}

void validate_perturb_restore(const char* op, at::TensorList params, const OptionalTensors* grads, at::TensorList saved,
                              at::IntArrayRef saved_slots, at::IntArrayRef saved_offsets, at::IntArrayRef saved_counts,
                              const at::Tensor& bits, const at::Tensor& block_prefix, at::IntArrayRef bit_offsets,
                              size_t n_rho, size_t n_adaptive, const at::Tensor& norm, bool allow_double) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads == nullptr || grads->size() == n, op, ": expected one gradient (or None) per parameter (", n,
                    "), got ", grads == nullptr ? 0 : grads->size());
  TORCH_CHECK_VALUE(saved_slots.size() == n && saved_offsets.size() == n && saved_counts.size() == n, op,
                    ": expected one saved slot, offset and count per parameter (", n, "), got ", saved_slots.size(),
                    ", ", saved_offsets.size(), " and ", saved_counts.size());
  TORCH_CHECK_VALUE(n_rho == n && n_adaptive == n, op, ": expected one rho and one adaptive flag per parameter (", n,
                    "), got ", n_rho, " and ", n_adaptive);
  validate_mask_bits(op, bits);
  TORCH_CHECK_TYPE(block_prefix.scalar_type() == at::kLong, op, ": expected block_prefix of dtype int64, got ",
                   block_prefix.scalar_type());
  TORCH_CHECK_VALUE(block_prefix.dim() == 1 && block_prefix.is_contiguous() &&
                        block_prefix.numel() == bits.numel() / kMaskAlignBytes + 1,
                    op, ": expected block_prefix to be a contiguous 1-D tensor of ", bits.numel() / kMaskAlignBytes + 1,
                    " counts (mask_block_prefix(bits)), got shape ", block_prefix.sizes());
  // The norm dtype (fsam_kernels.reference): fp64 only where fp64 tensors are, and only the CPU has them.
  const bool norm_ok = norm.defined() && norm.dim() == 0 &&
                       (norm.scalar_type() == at::kFloat || (allow_double && norm.scalar_type() == at::kDouble));
  TORCH_CHECK_VALUE(norm_ok, op, ": expected norm to be a 0-dim ", allow_double ? "float32 or float64" : "float32",
                    " tensor, got ", norm.defined() ? c10::str(norm.scalar_type(), norm.sizes()) : std::string("undefined"));
  check_offsets(op, bit_offsets, params, bits.numel() * 8, /*allow_dense=*/true);
  if (n == 0) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK_VALUE(bits.device() == dev, op, ": expected bits on ", dev, ", got ", bits.device());
  TORCH_CHECK_VALUE(block_prefix.device() == dev, op, ": expected block_prefix on ", dev, ", got ", block_prefix.device());
  TORCH_CHECK_VALUE(norm.device() == dev, op, ": expected norm on ", dev, ", got ", norm.device());
  for (size_t s = 0; s < saved.size(); ++s) {
    check_on(op, "saved", s, saved[s], dev);
    check_float(op, "saved", s, saved[s], allow_double);
  }
  std::vector<int64_t> next_free(saved.size(), 0);  // per buffer: where the previous tensor's originals end
  for (size_t i = 0; i < n; ++i) {
    check_on(op, "params", i, params[i], dev);
    check_float(op, "params", i, params[i], allow_double);
    const int64_t slot = saved_slots[i];
    if (grads != nullptr) {
      const std::optional<at::Tensor> g = grads->get(i);
      const bool has_grad = g.has_value() && g->defined();
      TORCH_CHECK_VALUE(has_grad == (slot != -1), op, ": expected grads[", i, "] ",
                        has_grad ? "to be None, as saved_slots[" : "to be a tensor, as saved_slots[", i, "] is ", slot);
      if (has_grad) check_grad(op, i, *g, params[i], allow_double);
    }
    if (slot == -1) continue;
    TORCH_CHECK_VALUE(slot >= 0 && slot < static_cast<int64_t>(saved.size()), op, ": expected saved_slots[", i,
                      "] in [0, ", saved.size(), ") (an index into saved) or -1, got ", slot);
    TORCH_CHECK_TYPE(saved[slot].scalar_type() == params[i].scalar_type(), op, ": expected saved[", slot,
                     "] (the buffer of params[", i, "]) of dtype ", params[i].scalar_type(),
                     " (the parameter's), got ", saved[slot].scalar_type());
    const int64_t count = saved_counts[i];
    if (bit_offsets[i] == -1) {
      TORCH_CHECK_VALUE(count == params[i].numel(), op, ": expected saved_counts[", i, "] of a dense tensor to be its numel ",
                        params[i].numel(), ", got ", count);
    } else {
      TORCH_CHECK_VALUE(count >= 0 && count <= params[i].numel(), op, ": expected saved_counts[", i,
                        "] (the set mask bits of params[", i, "]) in [0, ", params[i].numel(), "], got ", count);
    }
    const int64_t offset = saved_offsets[i];
    TORCH_CHECK_VALUE(offset >= next_free[slot], op, ": expected saved_offsets[", i, "] >= ", next_free[slot],
                      " (where the previous tensor's originals in saved[", slot,
                      "] end): ranges follow parameter order without overlapping, got ", offset);
    TORCH_CHECK_VALUE(offset + count <= saved[slot].numel(), op, ": saved[", slot, "] must hold the ", count,
                      " originals of params[", i, "] from offset ", offset, ", but has ", saved[slot].numel(),
                      " elements");
    next_free[slot] = offset + count;
  }
}

}  // namespace fsam
