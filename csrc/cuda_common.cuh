// Helpers of the CUDA kernels: the per-op tensor table (a device array of plain structs, one per
// tensor, uploaded with one asynchronous copy), the map from a work unit to its tensor, dtype
// dispatch, and 8-element vector loads.
//
// Multi-tensor scheme: every op covers its whole tensor list in a few launches. The tensors' elements
// are cut into fixed-size units (aligned to the 512-bit mask blocks inside each tensor); unit u belongs
// to the last tensor whose first unit is <= u (binary search in the table), so any number of tensors
// of any sizes is one grid-stride loop.
#pragma once

// Only light c10 CUDA headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS / cuSPARSE /
// cuSOLVER): faster to compile, and the kernels build with a minimal CUDA toolkit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fsam {
namespace cuda {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK_TYPE(false, "fsam_kernels: CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
  return kF32;  // unreachable
}

// Calls f(static_cast<T*>(nullptr)) with T the element type of dtype code `dt` (block-uniform).
template <typename F>
__device__ __forceinline__ void dispatch_dtype(int32_t dt, const F& f) {
  if (dt == kF32) {
    f(static_cast<float*>(nullptr));
  } else if (dt == kF16) {
    f(static_cast<c10::Half*>(nullptr));
  } else {
    f(static_cast<c10::BFloat16*>(nullptr));
  }
}

// Copies `infos` to the device in one asynchronous copy from pinned memory (no host synchronisation;
// the pinned block is recycled only once the copy is done).
template <typename Info>
at::Tensor upload_table(const std::vector<Info>& infos, const at::Device& device) {
  static_assert(std::is_trivially_copyable<Info>::value, "tables are copied bytewise");
  const int64_t bytes = static_cast<int64_t>(infos.size() * sizeof(Info));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), infos.data(), bytes);
  return host.to(device, /*non_blocking=*/true);
}

// upload_table, once per content: a step's ops (norm, perturb, restore, Fisher) build the same tables
// step after step (the tensors' addresses, sizes and dtypes), so each is uploaded once and found here
// afterwards, without a pinned allocation nor a copy per call. Keyed by the table's bytes (so a table
// that changed is never reused) and the device; least recently used out. The kernels only read tables.
template <typename Info>
at::Tensor cached_table(const std::vector<Info>& infos, const at::Device& device) {
  static_assert(std::is_trivially_copyable<Info>::value, "tables are compared bytewise");
  struct Entry {
    std::string key;
    at::Tensor table;
  };
  constexpr size_t kEntries = 16;
  static std::mutex lock;
  static auto* entries = new std::list<Entry>();  // never destroyed: no CUDA frees at process exit
  std::string key(reinterpret_cast<const char*>(infos.data()), infos.size() * sizeof(Info));
  key.append(reinterpret_cast<const char*>(&device), sizeof(device));
  const std::lock_guard<std::mutex> guard(lock);
  for (auto it = entries->begin(); it != entries->end(); ++it) {
    if (it->key == key) {
      entries->splice(entries->begin(), *entries, it);
      return it->table;
    }
  }
  entries->push_front({std::move(key), upload_table(infos, device)});
  if (entries->size() > kEntries) entries->pop_back();
  return entries->front().table;
}

template <typename Info>
const Info* table_ptr(const at::Tensor& table) {
  return reinterpret_cast<const Info*>(table.data_ptr<uint8_t>());
}

// Index of the tensor owning work unit `u`: the last one with unit_start <= u. Tables hold no empty
// tensors, so unit_start strictly increases.
template <typename Info>
__device__ __forceinline__ int find_tensor(const Info* infos, int n, int64_t u) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (infos[mid].unit_start <= u) lo = mid; else hi = mid - 1;
  }
  return lo;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid size for a grid-stride loop over `units`: enough resident blocks to fill the GPU.
inline int grid_for(int64_t units, int blocks_per_sm = 8) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, cap)));
}

// 8 consecutive elements as fp32: two 16-byte loads for fp32, one for fp16 / bf16.
// Requires 16-byte alignment of p (the caller checks it once per tensor).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  static_assert(sizeof(T) == 2, "fp16 / bf16");
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(h[j]);
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Selection key as an unsigned integer ordering like the reference's int32 key (see cpu_common.h).
template <bool kSquare>
__device__ __forceinline__ uint32_t select_key(float f) {
  if (kSquare) f = __fmul_rn(f, f);
  return __float_as_uint(f) ^ 0x80000000u;
}

}  // namespace cuda
}  // namespace fsam
