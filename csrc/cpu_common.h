// Helpers of the CPU implementations: work split into chunks over a tensor list, dtype dispatch,
// and the selection key.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace fsam {
namespace cpu {

// A contiguous piece [begin, end) of tensor `t`. Chunk starts are multiples of the mask block inside
// their tensor, so two chunks never write the same mask byte and per-block prefix counts line up.
struct Chunk {
  int64_t t;
  int64_t begin;
  int64_t end;
};

constexpr int64_t kChunk = 64 * kMaskAlignBits;  // 32768 elements: enough work per task, many tasks

template <typename Numel>
std::vector<Chunk> make_chunks(int64_t n_tensors, Numel numel_of) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t n = numel_of(t);
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

inline std::vector<Chunk> make_chunks(at::TensorList ts) {
  return make_chunks(static_cast<int64_t>(ts.size()), [&](int64_t t) { return ts[t].numel(); });
}

// Runs f(i) for every chunk index in parallel (at::parallel_for, one chunk per grain).
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// Calls f(static_cast<T*>(nullptr)) with T the C++ type of `t` (fp32, fp16, bf16, fp64).
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const F& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t);
  }
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Selection key as an unsigned integer that orders like the reference's int32 key (the bit pattern of
// the fp32 score): flipping the sign bit maps signed order onto unsigned order.
template <bool kSquare, typename T>
inline uint32_t select_key(T x) {
  float f = static_cast<float>(x);
  if (kSquare) f = f * f;
  return float_bits(f) ^ 0x80000000u;
}

}  // namespace cpu
}  // namespace fsam
