// Gradient norm, masked perturbation and exact restore on the CPU.
//
// The saved originals are compact: for a masked tensor, the j-th set bit of its mask saves its value
// at saved[j]. Each chunk finds its first saved position from the per-block prefix counts
// (mask_block_prefix), so chunks run in parallel. Dense tensors (bit offset -1) save every element.
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cpu_common.h"

namespace fsam {
namespace cpu {
namespace {

// Sum of squares of g (or of |w| * g for ASAM) over [begin, end): 16 independent fp32 accumulators
// (so the compiler can vectorise without reassociating), folded into fp64 every 1024 elements.
template <bool kAsam, typename G, typename W>
double sum_squares(const G* g, const W* w, int64_t begin, int64_t end) {
  constexpr int kLanes = 16;
  double total = 0.0;
  for (int64_t block = begin; block < end; block += 1024) {
    const int64_t stop = std::min(end, block + 1024);
    float acc[kLanes] = {};
    int64_t i = block;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        float v = static_cast<float>(g[i + j]);
        if (kAsam) v = std::fabs(static_cast<float>(w[i + j])) * v;
        acc[j] += v * v;
      }
    }
    for (; i < stop; ++i) {
      float v = static_cast<float>(g[i]);
      if (kAsam) v = std::fabs(static_cast<float>(w[i])) * v;
      acc[0] += v * v;
    }
    for (float a : acc) total += a;
  }
  return total;
}

at::Tensor grad_norm_cpu(at::TensorList params, at::TensorList grads, c10::List<bool> adaptive) {
  constexpr const char* op = "fsam_kernels::grad_norm";
  validate_grad_norm(op, params, grads, adaptive.size(), /*allow_double=*/true);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  const auto chunks = make_chunks(grads);
  // Per-chunk partial sums added in a fixed order: deterministic, and at least as accurate as the
  // reference's fp32 per-tensor norms.
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    dispatch_float(grads[ch.t].scalar_type(), op, [&](auto* gtag) {
      using G = std::remove_pointer_t<decltype(gtag)>;
      const G* g = static_cast<const G*>(grads[ch.t].data_ptr());
      if (!adaptive.get(ch.t)) {
        partial[c] = sum_squares<false>(g, g, ch.begin, ch.end);
        return;
      }
      dispatch_float(params[ch.t].scalar_type(), op, [&](auto* wtag) {
        using W = std::remove_pointer_t<decltype(wtag)>;
        partial[c] = sum_squares<true>(g, static_cast<const W*>(params[ch.t].data_ptr()), ch.begin, ch.end);
      });
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  out.fill_(static_cast<float>(std::sqrt(total)));
  return out;
}

// Whether bit b of the packed mask is set.
inline bool mask_bit(const uint8_t* bits, int64_t b) {
  return (bits[b >> 3] >> (b & 7)) & 1u;
}

// First compact saved position of a chunk of a masked tensor.
inline int64_t saved_start(const int64_t* block_prefix, int64_t bit_offset, int64_t begin) {
  return block_prefix[(bit_offset + begin) / kMaskAlignBits] - block_prefix[bit_offset / kMaskAlignBits];
}

void check_saved_sizes(const char* op, at::TensorList params, at::TensorList saved, const at::Tensor& block_prefix,
                       at::IntArrayRef bit_offsets) {
  for (const auto i : c10::irange(params.size())) {
    if (bit_offsets[i] == -1) continue;
    const int64_t count = masked_count_cpu(block_prefix, bit_offsets[i], params[i].numel());
    TORCH_CHECK_VALUE(saved[i].numel() == count, op, ": saved[", i, "] must hold the ", count,
                      " masked elements of params[", i, "], got ", saved[i].numel());
  }
}

void masked_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& bits,
                        const at::Tensor& block_prefix, at::IntArrayRef bit_offsets, at::ArrayRef<double> rho,
                        c10::List<bool> adaptive, const at::Tensor& norm, double eps) {
  constexpr const char* op = "fsam_kernels::masked_perturb";
  validate_perturb_restore(op, params, grads, saved, bits, block_prefix, bit_offsets, rho.size(), adaptive.size(),
                           norm, /*allow_double=*/true);
  if (params.empty()) return;
  check_saved_sizes(op, params, saved, block_prefix, bit_offsets);
  const float n = norm.item<float>();
  if (!std::isfinite(n)) return;  // weights untouched, like the reference
  const float denom = n + static_cast<float>(eps);
  const uint8_t* mask = bits.data_ptr<uint8_t>();
  const int64_t* prefix = block_prefix.data_ptr<int64_t>();
  const auto chunks = make_chunks(params);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const float scale = static_cast<float>(rho[ch.t]) / denom;
    const bool asam = adaptive.get(ch.t);
    const int64_t bo = bit_offsets[ch.t];
    dispatch_float(params[ch.t].scalar_type(), op, [&](auto* wtag) {
      using W = std::remove_pointer_t<decltype(wtag)>;
      W* w = static_cast<W*>(params[ch.t].data_ptr());
      W* s = static_cast<W*>(saved[ch.t].data_ptr());
      dispatch_float(grads[ch.t].scalar_type(), op, [&](auto* gtag) {
        using G = std::remove_pointer_t<decltype(gtag)>;
        const G* g = static_cast<const G*>(grads[ch.t].data_ptr());
        auto move = [&](int64_t i) {
          const float wf = static_cast<float>(w[i]);
          const float gf = static_cast<float>(g[i]);
          const float e = asam ? ((wf * wf) * gf) * scale : gf * scale;
          w[i] = static_cast<W>(wf + e);
        };
        if (bo == -1) {
          for (int64_t i = ch.begin; i < ch.end; ++i) {
            s[i] = w[i];
            move(i);
          }
          return;
        }
        int64_t pos = saved_start(prefix, bo, ch.begin);
        for (int64_t i = ch.begin; i < ch.end; ++i) {
          if (!mask_bit(mask, bo + i)) continue;
          s[pos++] = w[i];
          move(i);
        }
      });
    });
  });
}

void masked_restore_cpu(at::TensorList params, at::TensorList saved, const at::Tensor& bits,
                        const at::Tensor& block_prefix, at::IntArrayRef bit_offsets, const at::Tensor& norm) {
  constexpr const char* op = "fsam_kernels::masked_restore";
  validate_perturb_restore(op, params, {}, saved, bits, block_prefix, bit_offsets, params.size(), params.size(), norm,
                           /*allow_double=*/true);
  if (params.empty()) return;
  check_saved_sizes(op, params, saved, block_prefix, bit_offsets);
  if (!std::isfinite(norm.item<float>())) return;  // nothing was perturbed
  const uint8_t* mask = bits.data_ptr<uint8_t>();
  const int64_t* prefix = block_prefix.data_ptr<int64_t>();
  const auto chunks = make_chunks(params);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const int64_t bo = bit_offsets[ch.t];
    // Restoring copies bytes: no arithmetic, so any element size will do.
    const int64_t size = params[ch.t].element_size();
    char* w = static_cast<char*>(params[ch.t].data_ptr());
    const char* s = static_cast<const char*>(saved[ch.t].data_ptr());
    if (bo == -1) {
      std::memcpy(w + ch.begin * size, s + ch.begin * size, (ch.end - ch.begin) * size);
      return;
    }
    int64_t pos = saved_start(prefix, bo, ch.begin);
    for (int64_t i = ch.begin; i < ch.end; ++i) {
      if (mask_bit(mask, bo + i)) std::memcpy(w + i * size, s + (pos++) * size, size);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CPU, m) {
  m.impl("grad_norm", &grad_norm_cpu);
  m.impl("masked_perturb", &masked_perturb_cpu);
  m.impl("masked_restore", &masked_restore_cpu);
}

}  // namespace cpu
}  // namespace fsam
