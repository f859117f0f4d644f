// Gradient norm, masked perturbation and exact restore on the CPU.
//
// The saved originals are compact, one buffer per weight dtype: tensor i's start at saved_offsets[i]
// of buffer saved_slots[i] (-1: no gradient, left alone); for a masked tensor, the j-th set bit of
// its mask saves its value at slot j from there. Each chunk finds its first slot from the per-block
// prefix counts (mask_block_prefix), so chunks of every tensor run in parallel (at::parallel_for).
// Dense tensors (bit offset -1) save every element. saved_counts (validated against the buffers in
// checks.cpp, the same on every device) bound each tensor's range.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "checks.h"
#include "cpu_common.h"

namespace fsam {
namespace cpu {
namespace {

// Sum of squares of g (or of |w| * g for ASAM) over [begin, end): the norm rule of every backend
// (docs/backends.md). The product v = fl32(|w| * g) is the reference's (fl64 when an input is fp64);
// its square is exact in fp64 and cannot overflow there (the reference's skip rule), and the squares
// are summed in fp64: the fp64 rounding stays far below fp32's, so the fp32 norm is the same, bit for
// bit, whatever the summation order (the Triton and CUDA kernels sum in other orders).
template <bool kAsam, typename G, typename W>
double sum_squares_fp64(const G* g, const W* w, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    double v = static_cast<double>(g[i]);
    if (kAsam) v = std::fabs(static_cast<double>(w[i])) * v;
    total += v * v;
  }
  return total;
}

// Four fp32 lanes of GCC/Clang's vector extension. Written out, because left to itself the compiler
// vectorised the 16-lane loop across iterations (stride-16 shuffles), 4x slower than plain loads; the
// arithmetic is the same, lane for lane, so the sums are bit for bit those of the scalar loop.
typedef float Lanes4 __attribute__((vector_size(16)));

typedef uint32_t Bits4 __attribute__((vector_size(16)));
typedef uint16_t Halves8 __attribute__((vector_size(16)));

// Four elements as fp32 lanes; kAbs: their absolute values (the sign bit cleared, as std::fabs does).
template <bool kAbs, typename T>
inline Lanes4 load_lanes4(const T* p) {
  Lanes4 v;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the top half of an fp32: interleave zero low halves with the four values (one unpack).
    Halves8 raw = {}, zero = {};
    std::memcpy(&raw, p, 4 * sizeof(T));
#if defined(__clang__)
    const Halves8 bits = __builtin_shufflevector(zero, raw, 0, 8, 1, 9, 2, 10, 3, 11);
#else
    const Halves8 bits = __builtin_shuffle(zero, raw, Halves8{0, 8, 1, 9, 2, 10, 3, 11});
#endif
    std::memcpy(&v, &bits, sizeof(v));
  } else {
    v = Lanes4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
               static_cast<float>(p[3])};
  }
  if constexpr (kAbs) {
    Bits4 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    bits &= 0x7fffffffu;
    std::memcpy(&v, &bits, sizeof(v));
  }
  return v;
}

typedef double Doubles4 __attribute__((vector_size(32)));

template <bool kAsam, typename G, typename W>
double sum_squares(const G* g, const W* w, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<G, double> || std::is_same_v<W, double>) {
    return sum_squares_fp64<kAsam>(g, w, begin, end);
  } else {
    constexpr int kLanes = 16;  // lane j sums the squares of elements j, j + 16, j + 32, ...
    Doubles4 acc[kLanes / 4] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (int k = 0; k < kLanes / 4; ++k) {
        Lanes4 v = load_lanes4<false>(g + i + 4 * k);
        if (kAsam) v = load_lanes4<true>(w + i + 4 * k) * v;
        const Doubles4 d = __builtin_convertvector(v, Doubles4);
        acc[k] += d * d;
      }
    }
    double lanes[kLanes];
    std::memcpy(lanes, acc, sizeof(lanes));
    for (; i < end; ++i) {
      float v = static_cast<float>(g[i]);
      if (kAsam) v = std::fabs(static_cast<float>(w[i])) * v;
      lanes[0] += static_cast<double>(v) * static_cast<double>(v);
    }
    double total = 0.0;
    for (double a : lanes) total += a;
    return total;
  }
}

// The norm dtype (fsam_kernels.reference): fp64 when any tensor's weight or gradient is fp64.
bool any_double(at::TensorList params, const std::vector<at::Tensor>& grads) {
  for (size_t t = 0; t < params.size(); ++t) {
    if (!grads[t].defined()) continue;
    if (params[t].scalar_type() == at::kDouble || grads[t].scalar_type() == at::kDouble) return true;
  }
  return false;
}

at::Tensor grad_norm_cpu(at::TensorList params, const OptionalTensors& grads_in, c10::List<bool> adaptive) {
  constexpr const char* op = "fsam_kernels::grad_norm";
  validate_grad_norm(op, params, grads_in, adaptive.size(), /*allow_double=*/true);
  const std::vector<at::Tensor> grads = contiguous_grads(grads_in);
  const bool fp64 = any_double(params, grads);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(fp64 ? at::kDouble : at::kFloat));
  const auto chunks = make_chunks(static_cast<int64_t>(grads.size()),
                                  [&](int64_t t) { return grads[t].defined() ? grads[t].numel() : 0; });
  // Per-chunk partial sums added in a fixed order: deterministic, and at least as accurate as the
  // reference's per-tensor norms.
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
  if (fp64) {
    out.fill_(std::sqrt(total));
  } else {
    out.fill_(static_cast<float>(std::sqrt(total)));  // inf beyond fp32's range: the skip rule
  }
  return out;
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the packed mask is read as little-endian 64-bit words");

// Calls f(i, pos) for every set mask bit i in [begin, end) of the tensor at bit offset `bo`, pos being
// its compact saved slot, counted from `pos`. Bit offsets and chunk starts are multiples of the mask
// block, so the words are whole; only the set bits are visited (at 10 % density, 6 of 64), with no
// data-dependent branch per element. Words stay inside the mask: check_offsets keeps every tensor's
// bits, rounded up to a block, within it.
template <typename F>
inline void for_each_set_bit(const uint8_t* mask, int64_t bo, int64_t begin, int64_t end, int64_t pos, const F& f) {
  for (int64_t base = begin; base < end; base += 64) {
    uint64_t word;
    std::memcpy(&word, mask + ((bo + base) >> 3), sizeof(word));
    if (end - base < 64) word &= (uint64_t{1} << (end - base)) - 1;  // bits past the tensor's end are not its own
    while (word != 0) {
      f(base + __builtin_ctzll(word), pos++);
      word &= word - 1;
    }
  }
}

// First compact saved position of a chunk of a masked tensor.
inline int64_t saved_start(const int64_t* block_prefix, int64_t bit_offset, int64_t begin) {
  return block_prefix[(bit_offset + begin) / kMaskAlignBits] - block_prefix[bit_offset / kMaskAlignBits];
}

// Whether compact slot `pos` lies inside a saved buffer of `count` elements. Always true when the
// counts agree with the mask (the caller's promise); it only keeps inconsistent inputs in bounds,
// exactly like the CUDA kernel's guard.
inline bool in_saved(int64_t pos, int64_t count) {
  return static_cast<uint64_t>(pos) < static_cast<uint64_t>(count);
}

// Chunks of the tensors that have originals to save or restore (saved slot != -1).
std::vector<Chunk> saved_chunks(at::TensorList params, at::IntArrayRef saved_slots) {
  return make_chunks(static_cast<int64_t>(params.size()),
                     [&](int64_t t) { return saved_slots[t] == -1 ? int64_t{0} : params[t].numel(); });
}

void masked_perturb_cpu(at::TensorList params, const OptionalTensors& grads_in, at::TensorList saved,
                        at::IntArrayRef saved_slots, at::IntArrayRef saved_offsets, at::IntArrayRef saved_counts,
                        const at::Tensor& bits, const at::Tensor& block_prefix, at::IntArrayRef bit_offsets,
                        at::ArrayRef<double> rho, c10::List<bool> adaptive, const at::Tensor& norm, double eps) {
  constexpr const char* op = "fsam_kernels::masked_perturb";
  validate_perturb_restore(op, params, &grads_in, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix,
                           bit_offsets, rho.size(), adaptive.size(), norm, /*allow_double=*/true);
  if (params.empty()) return;
  const double n = norm.item<double>();
  if (!std::isfinite(n)) return;  // weights untouched, like the reference
  const bool norm_fp64 = norm.scalar_type() == at::kDouble;
  const std::vector<at::Tensor> grads = contiguous_grads(grads_in);
  const uint8_t* mask = bits.data_ptr<uint8_t>();
  const int64_t* prefix = block_prefix.data_ptr<int64_t>();
  const auto chunks = saved_chunks(params, saved_slots);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    // The reference's roundings, in the norm's dtype: a correctly rounded reciprocal, then one
    // multiply by fl(rho) (not rho / denom, which rounds once and can differ in the last bit); then
    // rounded to each tensor's compute dtype. Built with -ffp-contract=off, so nothing here is fused.
    // A zero norm (an all-zero gradient) perturbs by exactly 0, whatever rho and eps (0 * inf is NaN).
    const double scale64 = n == 0.0 ? 0.0 : (1.0 / (n + eps)) * rho[ch.t];
    const float scale32 = norm_fp64 || n == 0.0 ? static_cast<float>(scale64)
                                    : (1.0f / (static_cast<float>(n) + static_cast<float>(eps))) * static_cast<float>(rho[ch.t]);
    const bool asam = adaptive.get(ch.t);
    const int64_t bo = bit_offsets[ch.t];
    dispatch_float(params[ch.t].scalar_type(), op, [&](auto* wtag) {
      using W = std::remove_pointer_t<decltype(wtag)>;
      W* w = static_cast<W*>(params[ch.t].data_ptr());
      W* s = static_cast<W*>(saved[saved_slots[ch.t]].data_ptr()) + saved_offsets[ch.t];
      dispatch_float(grads[ch.t].scalar_type(), op, [&](auto* gtag) {
        using G = std::remove_pointer_t<decltype(gtag)>;
        const G* g = static_cast<const G*>(grads[ch.t].data_ptr());
        // The compute dtype: fp64 when the weight or the gradient is fp64.
        using C = std::conditional_t<std::is_same_v<W, double> || std::is_same_v<G, double>, double, float>;
        const C scale = std::is_same_v<C, double> ? static_cast<C>(norm_fp64 ? scale64 : static_cast<double>(scale32))
                                                  : static_cast<C>(scale32);
        auto move = [&](int64_t i) {
          const C wc = static_cast<C>(w[i]);
          const C gc = static_cast<C>(g[i]);
          const C e = asam ? ((wc * wc) * gc) * scale : gc * scale;
          w[i] = static_cast<W>(wc + e);
        };
        if (bo == -1) {
          for (int64_t i = ch.begin; i < ch.end; ++i) {
            s[i] = w[i];
            move(i);
          }
          return;
        }
        const int64_t count = saved_counts[ch.t];
        for_each_set_bit(mask, bo, ch.begin, ch.end, saved_start(prefix, bo, ch.begin), [&](int64_t i, int64_t pos) {
          if (in_saved(pos, count)) {
            s[pos] = w[i];
            move(i);
          }
        });
      });
    });
  });
}

void masked_restore_cpu(at::TensorList params, at::TensorList saved, at::IntArrayRef saved_slots,
                        at::IntArrayRef saved_offsets, at::IntArrayRef saved_counts, const at::Tensor& bits,
                        const at::Tensor& block_prefix, at::IntArrayRef bit_offsets, const at::Tensor& norm) {
  constexpr const char* op = "fsam_kernels::masked_restore";
  validate_perturb_restore(op, params, nullptr, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix,
                           bit_offsets, params.size(), params.size(), norm, /*allow_double=*/true);
  if (params.empty()) return;
  if (!std::isfinite(norm.item<double>())) return;  // nothing was perturbed
  const uint8_t* mask = bits.data_ptr<uint8_t>();
  const int64_t* prefix = block_prefix.data_ptr<int64_t>();
  const auto chunks = saved_chunks(params, saved_slots);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const int64_t bo = bit_offsets[ch.t];
    // Restoring copies bytes: no arithmetic, so any element size will do.
    const int64_t size = params[ch.t].element_size();
    char* w = static_cast<char*>(params[ch.t].data_ptr());
    const char* s = static_cast<const char*>(saved[saved_slots[ch.t]].data_ptr()) + saved_offsets[ch.t] * size;
    if (bo == -1) {
      std::memcpy(w + ch.begin * size, s + ch.begin * size, (ch.end - ch.begin) * size);
      return;
    }
    const int64_t count = saved_counts[ch.t];
    const int64_t start = saved_start(prefix, bo, ch.begin);
    // A copy of a compile-time size per kept element: one move, where a run-time size is a call.
    auto copy_kept = [&](auto size_tag) {
      constexpr int64_t kSize = decltype(size_tag)::value;
      for_each_set_bit(mask, bo, ch.begin, ch.end, start, [&](int64_t i, int64_t pos) {
        if (in_saved(pos, count)) std::memcpy(w + i * kSize, s + pos * kSize, kSize);
      });
    };
    switch (size) {
      case 2: copy_kept(std::integral_constant<int64_t, 2>{}); break;
      case 4: copy_kept(std::integral_constant<int64_t, 4>{}); break;
      default: copy_kept(std::integral_constant<int64_t, 8>{}); break;  // fp64 (validated)
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
