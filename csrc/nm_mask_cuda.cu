// N:M structured mask on CUDA; same algorithm and result as csrc/nm_mask_cpu.cpp (see there). One launch
// for all tensors (a device table, grid-stride over their mask bytes); one thread per mask byte (8
// elements), each element ranking itself inside its group of m from the group's m keys.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_common.cuh"

namespace fsam {
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

// One mask byte (elements 8b .. 8b+7) of a tensor: each element ranks itself inside its group of m.
// One 64-bit division per byte (the first element's group); the next elements step through the group
// with 32-bit arithmetic.
template <bool kSquare, typename T, typename W>
__device__ __forceinline__ uint8_t nm_byte(const T* s, const W* w, int64_t b, int64_t numel, int n, int m) {
  uint8_t byte = 0;
  int64_t g = b * 8 / m * m;  // first element of the group of element 8b
  int pos = static_cast<int>(b * 8 - g);
  for (int bit = 0; bit < 8; ++bit, ++pos) {
    if (pos == m) {  // the next group
      g += m;
      pos = 0;
    }
    const int64_t e = g + pos;
    if (e >= numel) break;
    if (is_zero(w, e)) continue;
    const uint32_t own = nm_key<kSquare>(s, w, e);
    int beaten = 0;
    for (int q = 0; q < m; ++q) {
      const uint32_t other = nm_key<kSquare>(s, w, g + q);
      beaten += (other > own) || (other == own && q < pos);
    }
    if (beaten < n) byte |= static_cast<uint8_t>(1u << bit);
  }
  return byte;
}

// A tensor of the launch: its mask bytes are numbered from unit_start in the launch (one thread per
// byte, grid-stride), and written from out_byte on in the packed mask.
struct NMInfo {
  const void* scores;
  const void* support;  // nullptr: no support
  int64_t numel;
  int64_t unit_start;
  int64_t out_byte;
  int32_t score_dtype;
  int32_t support_dtype;
};

template <bool kSquare>
__global__ void __launch_bounds__(kThreads) nm_mask_kernel(const NMInfo* infos, int n_tensors, int64_t n_bytes, int n,
                                                           int m, uint8_t* __restrict__ out) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < n_bytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const NMInfo info = infos[find_tensor(infos, n_tensors, b)];
    const int64_t local = b - info.unit_start;
    uint8_t byte = 0;
    dispatch_dtype(info.score_dtype, [&](auto* stag) {
      using T = std::remove_pointer_t<decltype(stag)>;
      const T* s = static_cast<const T*>(info.scores);
      if (info.support == nullptr) {
        byte = nm_byte<kSquare>(s, static_cast<const float*>(nullptr), local, info.numel, n, m);
      } else {
        dispatch_dtype(info.support_dtype, [&](auto* wtag) {
          using W = std::remove_pointer_t<decltype(wtag)>;
          byte = nm_byte<kSquare>(s, static_cast<const W*>(info.support), local, info.numel, n, m);
        });
      }
    });
    out[info.out_byte + local] = byte;
  }
}

at::Tensor select_nm_mask_cuda(at::TensorList scores, at::TensorList support, at::IntArrayRef bit_offsets,
                               int64_t mask_bytes, int64_t n, int64_t m, bool square) {
  validate_select_nm_mask(kNMOp, scores, support, bit_offsets, mask_bytes, n, m, /*allow_double=*/false);
  TORCH_CHECK_VALUE(!scores.empty(), kNMOp, ": expected at least one score tensor");
  const at::Device device = scores[0].device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor bits = at::zeros({mask_bytes}, scores[0].options().dtype(at::kByte));
  // All tensors in one launch: a table of their bytes (empty tensors left out).
  std::vector<NMInfo> infos;
  int64_t n_bytes = 0;
  for (size_t t = 0; t < scores.size(); ++t) {
    const int64_t numel = scores[t].numel();
    if (numel == 0) continue;
    const bool has_support = !support.empty();
    infos.push_back({scores[t].data_ptr(), has_support ? support[t].data_ptr() : nullptr, numel, n_bytes,
                     bit_offsets[t] / 8, dtype_code(scores[t].scalar_type()),
                     has_support ? dtype_code(support[t].scalar_type()) : 0});
    n_bytes += (numel + 7) / 8;
  }
  if (infos.empty()) return bits;
  const at::Tensor table = upload_table(infos, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = grid_for((n_bytes + kThreads - 1) / kThreads);
  const auto* info_ptr = table_ptr<NMInfo>(table);
  const int count = static_cast<int>(infos.size());
  if (square) {
    nm_mask_kernel<true><<<grid, kThreads, 0, stream>>>(info_ptr, count, n_bytes, static_cast<int>(n),
                                                        static_cast<int>(m), bits.data_ptr<uint8_t>());
  } else {
    nm_mask_kernel<false><<<grid, kThreads, 0, stream>>>(info_ptr, count, n_bytes, static_cast<int>(n),
                                                         static_cast<int>(m), bits.data_ptr<uint8_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

}  // namespace
}  // namespace cuda
}  // namespace fsam

TORCH_LIBRARY_IMPL(fsam_kernels, CUDA, m) {
  m.impl("select_nm_mask", &fsam::cuda::select_nm_mask_cuda);
}
