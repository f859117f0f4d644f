// N:M structured mask on CUDA; same algorithm and result as csrc/nm_mask.cpp (see there). One launch
// per tensor (the op runs only when the mask is rebuilt); one thread per mask byte (8 elements), each
// element ranking itself inside its group of m from the group's m keys.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "checks.h"

namespace fsam {

void validate_select_nm_mask(const char* op, at::TensorList scores, at::TensorList support,
                             at::IntArrayRef bit_offsets, int64_t mask_bytes, int64_t n, int64_t m, bool allow_double);

namespace cuda {
namespace {

constexpr const char* kNMOp = "fsam_kernels::select_nm_mask";
constexpr uint32_t kDeadKey = 0x7fffffffu;  // int32 -1 with the sign bit flipped: below every score
constexpr int kThreads = 256;

template <typename W>
__device__ __forceinline__ bool is_zero(const W* w, int64_t i) {
  return w != nullptr && static_cast<float>(w[i]) == 0.f;
}

// Orders like the reference's int32 key (the fp32 bit pattern) once the sign bit is flipped.
template <bool kSquare, typename T, typename W>
__device__ __forceinline__ uint32_t nm_key(const T* s, const W* w, int64_t i) {
  if (is_zero(w, i)) return kDeadKey;
  float f = static_cast<float>(s[i]);
  if (kSquare) f = __fmul_rn(f, f);
  return __float_as_uint(f) ^ 0x80000000u;
}

template <bool kSquare, typename T, typename W>
__global__ void nm_mask_kernel(const T* __restrict__ s, const W* __restrict__ w, int64_t numel, int n, int m,
                               uint8_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b * 8 >= numel) return;
  uint8_t byte = 0;
  for (int bit = 0; bit < 8; ++bit) {
    const int64_t e = b * 8 + bit;
    if (e >= numel) break;
    if (is_zero(w, e)) continue;
    const int64_t g = e / m * m;
    const int pos = static_cast<int>(e - g);
    const uint32_t own = nm_key<kSquare>(s, w, e);
    int beaten = 0;
    for (int q = 0; q < m; ++q) {
      const uint32_t other = nm_key<kSquare>(s, w, g + q);
      beaten += (other > own) || (other == own && q < pos);
    }
    if (beaten < n) byte |= static_cast<uint8_t>(1u << bit);
  }
  out[b] = byte;
}

template <typename F>
void dispatch_cuda_float(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK_TYPE(false, kNMOp, ": unsupported dtype ", t);
  }
}

at::Tensor select_nm_mask_cuda(at::TensorList scores, at::TensorList support, at::IntArrayRef bit_offsets,
                               int64_t mask_bytes, int64_t n, int64_t m, bool square) {
  validate_select_nm_mask(kNMOp, scores, support, bit_offsets, mask_bytes, n, m, /*allow_double=*/false);
  TORCH_CHECK_VALUE(!scores.empty(), kNMOp, ": expected at least one score tensor");
  const c10::cuda::CUDAGuard guard(scores[0].device());
  at::Tensor bits = at::zeros({mask_bytes}, scores[0].options().dtype(at::kByte));
  uint8_t* out = bits.data_ptr<uint8_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t t = 0; t < scores.size(); ++t) {
    const int64_t numel = scores[t].numel();
    if (numel == 0) continue;
    const int64_t n_bytes = (numel + 7) / 8;
    const unsigned blocks = static_cast<unsigned>((n_bytes + kThreads - 1) / kThreads);
    uint8_t* dst = out + bit_offsets[t] / 8;
    dispatch_cuda_float(scores[t].scalar_type(), [&](auto* stag) {
      using T = std::remove_pointer_t<decltype(stag)>;
      const T* s = static_cast<const T*>(scores[t].data_ptr());
      auto launch = [&](auto* w) {
        using W = std::remove_const_t<std::remove_pointer_t<decltype(w)>>;
        if (square) {
          nm_mask_kernel<true, T, W><<<blocks, kThreads, 0, stream>>>(s, w, numel, static_cast<int>(n),
                                                                       static_cast<int>(m), dst);
        } else {
          nm_mask_kernel<false, T, W><<<blocks, kThreads, 0, stream>>>(s, w, numel, static_cast<int>(n),
                                                                        static_cast<int>(m), dst);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (support.empty()) {
        launch(static_cast<const float*>(nullptr));
      } else {
        dispatch_cuda_float(support[t].scalar_type(), [&](auto* wtag) {
          using W = std::remove_pointer_t<decltype(wtag)>;
          launch(static_cast<const W*>(support[t].data_ptr()));
        });
      }
    });
  }
  return bits;
}

}  // namespace
}  // namespace cuda
}  // namespace fsam

TORCH_LIBRARY_IMPL(fsam_kernels, CUDA, m) {
  m.impl("select_nm_mask", &fsam::cuda::select_nm_mask_cuda);
}
