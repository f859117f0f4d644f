// N:M structured mask on the CPU: in every group of m consecutive elements keep the n largest selection
// keys (tie: lowest index); support zeros get the key -1 and are never kept. Reference:
// fsam_kernels.reference.select_nm_mask_reference. The Python side passes only the eligible tensors
// (>= 2 dims, last dim divisible by m), so groups are runs of m consecutive flat elements.
//
// Each element finds its own rank by comparing its key with its group's m keys, and each task writes
// whole mask bytes: groups may straddle bytes and tasks with no coordination.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_common.h"

namespace fsam {
namespace cpu {
namespace {

constexpr const char* kNMOp = "fsam_kernels::select_nm_mask";
constexpr uint32_t kDeadKey = 0x7fffffffu;  // int32 -1 with the sign bit flipped: below every score
constexpr int64_t kGrainBytes = 4096;

template <bool kSquare, typename T, typename W>
inline uint32_t nm_key(const T* s, const W* w, int64_t i) {
  if (w != nullptr && static_cast<double>(w[i]) == 0.0) return kDeadKey;
  return select_key<kSquare>(s[i]);
}

template <bool kSquare, typename T, typename W>
void nm_mask_tensor(const T* s, const W* w, int64_t numel, int64_t n, int64_t m, uint8_t* out) {
  const int64_t n_bytes = (numel + 7) / 8;
  at::parallel_for(0, n_bytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t byte = 0;
      for (int64_t bit = 0; bit < 8; ++bit) {
        const int64_t e = b * 8 + bit;
        if (e >= numel) break;
        if (w != nullptr && static_cast<double>(w[e]) == 0.0) continue;
        const int64_t g = e / m * m;
        const int64_t pos = e - g;
        const uint32_t own = nm_key<kSquare>(s, w, e);
        int64_t beaten = 0;
        for (int64_t q = 0; q < m; ++q) {
          const uint32_t other = nm_key<kSquare>(s, w, g + q);
          beaten += (other > own) || (other == own && q < pos);
        }
        if (beaten < n) byte |= static_cast<uint8_t>(1u << bit);
      }
      out[b] = byte;
    }
  });
}

at::Tensor select_nm_mask_cpu(at::TensorList scores, at::TensorList support, at::IntArrayRef bit_offsets,
                              int64_t mask_bytes, int64_t n, int64_t m, bool square) {
  validate_select_nm_mask(kNMOp, scores, support, bit_offsets, mask_bytes, n, m, /*allow_double=*/true);
  at::Tensor bits = at::zeros({mask_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* out = bits.data_ptr<uint8_t>();
  for (size_t t = 0; t < scores.size(); ++t) {
    uint8_t* dst = out + bit_offsets[t] / 8;
    const int64_t numel = scores[t].numel();
    dispatch_float(scores[t].scalar_type(), kNMOp, [&](auto* stag) {
      using T = std::remove_pointer_t<decltype(stag)>;
      const T* s = static_cast<const T*>(scores[t].data_ptr());
      auto run = [&](auto* w) {
        if (square) {
          nm_mask_tensor<true>(s, w, numel, n, m, dst);
        } else {
          nm_mask_tensor<false>(s, w, numel, n, m, dst);
        }
      };
      if (support.empty()) {
        run(static_cast<const float*>(nullptr));
      } else {
        dispatch_float(support[t].scalar_type(), kNMOp, [&](auto* wtag) {
          using W = std::remove_pointer_t<decltype(wtag)>;
          run(static_cast<const W*>(support[t].data_ptr()));
        });
      }
    });
  }
  return bits;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CPU, m) {
  m.impl("select_nm_mask", &select_nm_mask_cpu);
}

}  // namespace cpu
}  // namespace fsam
