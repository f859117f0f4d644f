// Global top-k mask on CUDA, sync-free: an exact radix select over the selection keys.
//
//   3 x (histogram pass + pick):  11 + 11 + 10 bits of the key. Each block histograms its units in
//        shared memory with warp-aggregated atomics (lanes holding the same digit add once: Fisher
//        scores are full of repeated values, zeros above all), then flushes the non-zero bins to a
//        global histogram. A one-block pick kernel finds the bin holding the k-th largest key and
//        narrows the prefix; all of it stays on the device (no host synchronisation).
//   tie count: keys equal to the threshold per unit, exclusive-scanned with cub, so each unit knows
//        how many ties come before it in the global order (the tie rule: lowest bit index first).
//   write: each warp ballots 32 keys into one 32-bit word of the packed mask.
// The mask must equal the reference's bit for bit, ties, all-zero scores and k = N included
// (tests/test_native_gpu.py); the CPU version in mask_cpu.cpp is the same algorithm.
//
// The sharded top-k's primitives (key_histogram, mask_from_threshold) reuse the key loads, the tie
// count and the mask writer, with per-tensor tie quotas instead of a global one.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_common.cuh"

namespace fsam {
namespace cuda {
namespace {

constexpr const char* kSelectOp = "fsam_kernels::select_mask";
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kUnit = kThreads * 8;      // elements per unit (a multiple of the 512-bit mask block)
constexpr int kMaxBins = 2048;

struct KeyInfo {
  const void* scores;
  int64_t numel;
  int64_t unit_start;
  int64_t bit_offset;
  int32_t dtype;
  int32_t vectorized;
};

// Radix-select progress: keys matching `prefix` under `prefix_mask` are still candidates; `remaining`
// of them belong to the top k. After the last pass prefix is the threshold key and remaining the
// number of ties at the threshold that are taken.
struct SelectState {
  uint32_t prefix;
  uint32_t prefix_mask;
  long long remaining;
};

// Keys of elements i .. i+7 of a tensor (valid[j] false past its end).
template <bool kSquare>
__device__ __forceinline__ void load_keys8(const KeyInfo& info, int64_t i, uint32_t (&keys)[8], bool (&valid)[8]) {
  float v[8];
  dispatch_dtype(info.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* s = static_cast<const T*>(info.scores);
    if (info.vectorized && i + 8 <= info.numel) {
      load8(s + i, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = i + j < info.numel ? static_cast<float>(s[i + j]) : 0.f;
    }
  });
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    valid[j] = i + j < info.numel;
    keys[j] = select_key<kSquare>(v[j]);
  }
}

template <bool kSquare>
__device__ __forceinline__ uint32_t load_key(const KeyInfo& info, int64_t e) {
  float v = 0.f;
  dispatch_dtype(info.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    v = static_cast<float>(static_cast<const T*>(info.scores)[e]);
  });
  return select_key<kSquare>(v);
}

// The non-empty score tensors as a key table (their units numbered in order), with each entry's
// index in `scores`. `bit_offsets` may be empty (nothing is written to a mask).
struct KeyTable {
  std::vector<KeyInfo> infos;
  std::vector<int64_t> tensor;
  int64_t units = 0;
};

KeyTable key_table(at::TensorList scores, at::IntArrayRef bit_offsets) {
  KeyTable table;
  for (size_t t = 0; t < scores.size(); ++t) {
    const int64_t numel = scores[t].numel();
    if (numel == 0) continue;
    const void* p = scores[t].data_ptr();
    const int64_t offset = bit_offsets.empty() ? 0 : bit_offsets[t];
    table.infos.push_back({p, numel, table.units, offset, dtype_code(scores[t].scalar_type()), aligned16(p)});
    table.tensor.push_back(static_cast<int64_t>(t));
    table.units += (numel + kUnit - 1) / kUnit;
  }
  return table;
}

// Grid for the histogram kernels: enough blocks to fill the GPU, and at least enough that no block
// visits 2**31 keys or more in its grid-stride loop, since a block counts in 32-bit shared memory
// bins (reached only past 2**40 values on an H200, but a smaller GPU gets there sooner).
int histogram_grid(int64_t units) {
  constexpr int64_t kMaxUnitsPerBlock = (int64_t{1} << 31) / kUnit;
  return static_cast<int>(std::max<int64_t>(grid_for(units), (units + kMaxUnitsPerBlock - 1) / kMaxUnitsPerBlock));
}

__global__ void init_state_kernel(SelectState* state, uint32_t prefix, uint32_t prefix_mask, long long remaining) {
  state->prefix = prefix;
  state->prefix_mask = prefix_mask;
  state->remaining = remaining;
}

template <bool kSquare>
__global__ void __launch_bounds__(kThreads) radix_hist_kernel(const KeyInfo* infos, int n_tensors, int64_t n_units,
                                                               const SelectState* state, unsigned long long* hist,
                                                               int shift, int width) {
  __shared__ uint32_t bins[kMaxBins];
  const int n_bins = 1 << width;
  for (int d = threadIdx.x; d < n_bins; d += kThreads) bins[d] = 0;
  __syncthreads();
  const uint32_t prefix = state->prefix, prefix_mask = state->prefix_mask;
  const uint32_t digit_mask = static_cast<uint32_t>(n_bins - 1);
  const int lane = threadIdx.x & 31;
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const KeyInfo info = infos[find_tensor(infos, n_tensors, u)];
    const int64_t i = (u - info.unit_start) * kUnit + threadIdx.x * 8;
    uint32_t keys[8];
    bool valid[8];
    load_keys8<kSquare>(info, i, keys, valid);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const bool take = valid[j] && (keys[j] & prefix_mask) == prefix;
      const uint32_t digit = (keys[j] >> shift) & digit_mask;
      const unsigned active = __ballot_sync(0xffffffffu, take);
      if (take) {
        // Warp-aggregated atomic: one shared-memory add per distinct digit in the warp.
        const unsigned peers = __match_any_sync(active, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&bins[digit], static_cast<uint32_t>(__popc(peers)));
      }
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < n_bins; d += kThreads) {
    if (bins[d] != 0) atomicAdd(&hist[d], static_cast<unsigned long long>(bins[d]));
  }
}

// One block: find the bin (from the top) where the running count reaches `remaining`, narrow the
// state to it, and clear the histogram for the next pass.
__global__ void __launch_bounds__(kThreads) radix_pick_kernel(unsigned long long* hist, SelectState* state, int shift,
                                                               int width) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int n_bins = 1 << width;
  const int per_thread = n_bins / kThreads;  // 8 or 4; thread t owns bins top - t*per_thread - j
  const long long remaining = state->remaining;
  unsigned long long counts[kMaxBins / kThreads];
  unsigned long long sum = 0;
  for (int j = 0; j < per_thread; ++j) {
    const int d = n_bins - 1 - (threadIdx.x * per_thread + j);
    counts[j] = hist[d];
    hist[d] = 0;
    sum += counts[j];
  }
  unsigned long long before = 0;
  Scan(scan_storage).ExclusiveSum(sum, before);
  __syncthreads();  // every thread has read the state before the owner rewrites it
  const unsigned long long want = static_cast<unsigned long long>(remaining);
  if (before < want && want <= before + sum) {
    unsigned long long acc = before;
    for (int j = 0; j < per_thread; ++j) {
      if (acc + counts[j] >= want) {
        const uint32_t d = static_cast<uint32_t>(n_bins - 1 - (threadIdx.x * per_thread + j));
        state->prefix |= d << shift;
        state->prefix_mask |= static_cast<uint32_t>(n_bins - 1) << shift;
        state->remaining = remaining - static_cast<long long>(acc);
        break;
      }
      acc += counts[j];
    }
  }
}

template <bool kSquare>
__global__ void __launch_bounds__(kThreads) tie_count_kernel(const KeyInfo* infos, int n_tensors, int64_t n_units,
                                                              const SelectState* state, long long* ties) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const uint32_t threshold = state->prefix;
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const KeyInfo info = infos[find_tensor(infos, n_tensors, u)];
    const int64_t i = (u - info.unit_start) * kUnit + threadIdx.x * 8;
    uint32_t keys[8];
    bool valid[8];
    load_keys8<kSquare>(info, i, keys, valid);
    int count = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) count += valid[j] && keys[j] == threshold;
    const int total = Reduce(reduce_storage).Sum(count);
    if (threadIdx.x == 0) ties[u] = total;
    __syncthreads();  // reduce_storage is reused by the next unit
  }
}

// Warp w of a block writes elements [w*256, (w+1)*256) of the unit: 8 words of 32 bits, in order.
// Ties: the first `state->remaining` in the global order or, with kPerTensorQuota, the first quotas[t]
// of each tensor t (ties_before is then rebased to the tensor's first unit).
// A warp's 256 elements inside a 16-byte aligned tensor are read as 8 consecutive keys a lane (128-bit
// loads), each lane making one mask byte and four lanes one word; otherwise (the tensor's last partial
// warp range, or an unaligned tensor) lane l reads element s*32 + l of word s, and a ballot makes it.
template <bool kSquare, bool kPerTensorQuota = false>
__global__ void __launch_bounds__(kThreads) write_mask_kernel(const KeyInfo* infos, int n_tensors, int64_t n_units,
                                                               const SelectState* state, const long long* ties_before,
                                                               uint8_t* bits, const long long* quotas = nullptr) {
  constexpr int kWarpElems = kUnit / kWarps;
  constexpr int kWords = kWarpElems / 32;
  static_assert(kWords == 8, "a lane's 8 consecutive keys are one load8");
  __shared__ long long warp_ties[kWarps];
  const uint32_t threshold = state->prefix;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned below = lanemask_lt();
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const int t = find_tensor(infos, n_tensors, u);
    const KeyInfo info = infos[t];
    const long long need = kPerTensorQuota ? quotas[t] : state->remaining;
    const int64_t base = (u - info.unit_start) * kUnit + warp * kWarpElems;
    const bool wide = info.vectorized && base + kWarpElems <= info.numel;  // warp-uniform
    uint32_t keys[kWords];
    int my_ties = 0, lane_ties = 0, ties_below = 0;
    if (wide) {
      bool valid[8];
      load_keys8<kSquare>(info, base + lane * 8, keys, valid);
#pragma unroll
      for (int j = 0; j < 8; ++j) lane_ties += keys[j] == threshold;
      int inclusive = lane_ties;  // ties up to this lane's keys, by a warp scan
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += v;
      }
      ties_below = inclusive - lane_ties;
      my_ties = __shfl_sync(0xffffffffu, inclusive, 31);
    } else {
#pragma unroll
      for (int s = 0; s < kWords; ++s) {
        const int64_t e = base + s * 32 + lane;
        keys[s] = e < info.numel ? load_key<kSquare>(info, e) : 0u;
        my_ties += __popc(__ballot_sync(0xffffffffu, e < info.numel && keys[s] == threshold));
      }
    }
    if (lane == 0) warp_ties[warp] = my_ties;
    __syncthreads();
    long long rank = ties_before[u] - (kPerTensorQuota ? ties_before[info.unit_start] : 0);
    for (int w = 0; w < warp; ++w) rank += warp_ties[w];
    if (wide) {
      long long r = rank + ties_below;  // ties before this lane's first key in the global order
      uint32_t byte = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const bool tie = keys[j] == threshold;
        byte |= static_cast<uint32_t>(keys[j] > threshold || (tie && r < need)) << j;
        r += tie;
      }
      // lanes 4s .. 4s+3 hold the bytes of word s (little-endian: element order)
      uint32_t word = byte << (8 * (lane & 3));
      word |= __shfl_xor_sync(0xffffffffu, word, 1);
      word |= __shfl_xor_sync(0xffffffffu, word, 2);
      if ((lane & 3) == 0) *reinterpret_cast<uint32_t*>(bits + (info.bit_offset + base + lane * 8) / 8) = word;
    } else {
#pragma unroll
      for (int s = 0; s < kWords; ++s) {
        const int64_t first = base + s * 32;
        const bool valid = first + lane < info.numel;
        const unsigned tie = __ballot_sync(0xffffffffu, valid && keys[s] == threshold);
        const bool take = valid && (keys[s] > threshold ||
                                    (keys[s] == threshold && rank + __popc(tie & below) < need));
        const unsigned word = __ballot_sync(0xffffffffu, take);
        // Words past the tensor's end belong to its zero padding or to the next tensor: never written.
        if (lane == 0 && first < info.numel) {
          *reinterpret_cast<uint32_t*>(bits + (info.bit_offset + first) / 8) = word;
        }
        rank += __popc(tie);
      }
    }
    __syncthreads();  // warp_ties is reused by the next unit
  }
}

// Per unit, the keys equal to the threshold (state->prefix) in all units before it: the global order
// that decides which ties are taken.
template <bool kSquare>
at::Tensor count_ties_before(const KeyInfo* infos, int n_tensors, int64_t units, const SelectState* state, int grid,
                             const at::TensorOptions& opts) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ties = at::empty({units}, opts.dtype(at::kLong));
  auto* t = reinterpret_cast<long long*>(ties.data_ptr<int64_t>());
  tie_count_kernel<kSquare><<<grid, kThreads, 0, stream>>>(infos, n_tensors, units, state, t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor ties_before = at::empty({units}, opts.dtype(at::kLong));
  auto* out = reinterpret_cast<long long*>(ties_before.data_ptr<int64_t>());
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, t, out, units, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), temp_bytes, t, out, units, stream));
  return ties_before;
}

template <bool kSquare>
void launch_select(const KeyInfo* infos, int n_tensors, int64_t units, int64_t n, int64_t k, SelectState* state,
                   uint8_t* bits, const at::TensorOptions& opts) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = histogram_grid(units);
  at::Tensor ties_before;
  if (k == n) {  // threshold: the smallest possible key; every element is a taken "tie"
    init_state_kernel<<<1, 1, 0, stream>>>(state, 0u, 0xffffffffu, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ties_before = at::zeros({units}, opts.dtype(at::kLong));
  } else {
    init_state_kernel<<<1, 1, 0, stream>>>(state, 0u, 0u, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor hist = at::zeros({kMaxBins}, opts.dtype(at::kLong));
    auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    for (int p = 0; p < 3; ++p) {
      radix_hist_kernel<kSquare><<<grid, kThreads, 0, stream>>>(infos, n_tensors, units, state, h, shifts[p], widths[p]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      radix_pick_kernel<<<1, kThreads, 0, stream>>>(h, state, shifts[p], widths[p]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ties_before = count_ties_before<kSquare>(infos, n_tensors, units, state, grid, opts);
  }
  write_mask_kernel<kSquare><<<grid, kThreads, 0, stream>>>(
      infos, n_tensors, units, state, reinterpret_cast<const long long*>(ties_before.data_ptr<int64_t>()), bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------- sharded top-k primitives
// Keys here are the reference's int32 keys: key = int32(u ^ 0x80000000) for a selection key u.
constexpr const char* kHistogramOp = "fsam_kernels::key_histogram";
constexpr const char* kThresholdOp = "fsam_kernels::mask_from_threshold";

// Digit counts per tensor row. A block counts in shared memory (warp-aggregated atomics: Fisher keys
// crowd into a few bins, zeros above all) and flushes to its tensor's row whenever its grid-stride
// loop moves on to the next tensor (block-uniform: all threads share the unit). Digits wider than
// kMaxBins bins go straight to global memory.
template <bool kSquare>
__global__ void __launch_bounds__(kThreads) key_histogram_kernel(const KeyInfo* infos, const int64_t* rows,
                                                                  int n_tensors, int64_t n_units, int32_t prefix,
                                                                  int shift, int high, int width,
                                                                  unsigned long long* out) {
  __shared__ uint32_t bins[kMaxBins];
  const int n_bins = 1 << width;
  const bool in_shared = n_bins <= kMaxBins;
  const uint32_t digit_mask = static_cast<uint32_t>(n_bins - 1);
  const int lane = threadIdx.x & 31;
  for (int d = threadIdx.x; d < kMaxBins; d += kThreads) bins[d] = 0;
  __syncthreads();
  int current = -1;
  auto flush = [&](int t) {
    __syncthreads();
    unsigned long long* row = out + rows[t] * n_bins;
    for (int d = threadIdx.x; d < n_bins; d += kThreads) {
      if (bins[d] != 0) {
        atomicAdd(row + d, static_cast<unsigned long long>(bins[d]));
        bins[d] = 0;
      }
    }
    __syncthreads();
  };
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const int t = find_tensor(infos, n_tensors, u);
    if (in_shared && t != current) {
      if (current >= 0) flush(current);
      current = t;
    }
    const KeyInfo info = infos[t];
    unsigned long long* row = out + rows[t] * n_bins;
    const int64_t i = (u - info.unit_start) * kUnit + threadIdx.x * 8;
    uint32_t keys[8];
    bool valid[8];
    load_keys8<kSquare>(info, i, keys, valid);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int32_t key = static_cast<int32_t>(keys[j] ^ 0x80000000u);
      const bool take = valid[j] && key >= 0 && (high >= 32 || (key >> high) == prefix);
      const uint32_t digit = (static_cast<uint32_t>(key) >> shift) & digit_mask;
      const unsigned active = __ballot_sync(0xffffffffu, take);
      if (take) {
        const unsigned peers = __match_any_sync(active, digit);
        if (lane == __ffs(peers) - 1) {
          if (in_shared) {
            atomicAdd(&bins[digit], static_cast<uint32_t>(__popc(peers)));
          } else {
            atomicAdd(row + digit, static_cast<unsigned long long>(__popc(peers)));
          }
        }
      }
    }
  }
  if (in_shared && current >= 0) flush(current);
}

at::Tensor key_histogram_cuda(at::TensorList scores, bool square, int64_t prefix, int64_t shift, int64_t radix_bits) {
  validate_key_histogram(kHistogramOp, scores, prefix, shift, radix_bits, /*allow_double=*/false);
  const at::Device device = scores[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().device(device);
  const int64_t high = shift + radix_bits;
  at::Tensor out = at::zeros({static_cast<int64_t>(scores.size()), int64_t{1} << radix_bits}, opts.dtype(at::kLong));
  // keys are < 2**31: no key has bits above the top digit, nor a prefix of 2**(31 - high) or more
  if (high >= 32 ? prefix != 0 : prefix >= (int64_t{1} << (31 - high))) return out;
  const KeyTable keys = key_table(scores, {});
  if (keys.infos.empty()) return out;
  const std::vector<KeyInfo>& infos = keys.infos;
  const int64_t units = keys.units;
  const at::Tensor table = upload_table(infos, device);
  const at::Tensor row_table = upload_table(keys.tensor, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* o = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  const auto* info_ptr = table_ptr<KeyInfo>(table);
  const auto* row_ptr = table_ptr<int64_t>(row_table);
  const int count = static_cast<int>(infos.size());
  const int grid = histogram_grid(units);
  if (square) {
    key_histogram_kernel<true><<<grid, kThreads, 0, stream>>>(info_ptr, row_ptr, count, units, static_cast<int32_t>(prefix),
                                                              static_cast<int>(shift), static_cast<int>(high),
                                                              static_cast<int>(radix_bits), o);
  } else {
    key_histogram_kernel<false><<<grid, kThreads, 0, stream>>>(info_ptr, row_ptr, count, units, static_cast<int32_t>(prefix),
                                                               static_cast<int>(shift), static_cast<int>(high),
                                                               static_cast<int>(radix_bits), o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <bool kSquare>
void launch_threshold_mask(const KeyInfo* infos, const long long* quotas, int n_tensors, int64_t units,
                           SelectState* state, uint32_t threshold, uint8_t* bits, const at::TensorOptions& opts) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = grid_for(units);
  init_state_kernel<<<1, 1, 0, stream>>>(state, threshold, 0xffffffffu, 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor ties_before = count_ties_before<kSquare>(infos, n_tensors, units, state, grid, opts);
  const auto* before = reinterpret_cast<const long long*>(ties_before.data_ptr<int64_t>());
  write_mask_kernel<kSquare, true><<<grid, kThreads, 0, stream>>>(infos, n_tensors, units, state, before, bits, quotas);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mask_from_threshold_cuda(at::TensorList scores, at::IntArrayRef bit_offsets, int64_t mask_bytes, bool square,
                                    int64_t threshold, at::IntArrayRef quotas) {
  validate_mask_from_threshold(kThresholdOp, scores, bit_offsets, mask_bytes, threshold, quotas, /*allow_double=*/false);
  const at::Device device = scores[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().device(device);
  at::Tensor bits = at::zeros({mask_bytes}, opts.dtype(at::kByte));
  const KeyTable keys = key_table(scores, bit_offsets);
  if (keys.infos.empty()) return bits;
  const std::vector<KeyInfo>& infos = keys.infos;
  const int64_t units = keys.units;
  std::vector<long long> tensor_quotas;
  for (const int64_t t : keys.tensor) tensor_quotas.push_back(static_cast<long long>(quotas[t]));
  const at::Tensor table = upload_table(infos, device);
  const at::Tensor quota_table = upload_table(tensor_quotas, device);
  at::Tensor state = at::empty({static_cast<int64_t>(sizeof(SelectState))}, opts.dtype(at::kByte));
  auto* st = reinterpret_cast<SelectState*>(state.data_ptr<uint8_t>());
  const uint32_t thr = static_cast<uint32_t>(threshold) ^ 0x80000000u;  // in the selection-key order
  const auto* info_ptr = table_ptr<KeyInfo>(table);
  const auto* quota_ptr = table_ptr<long long>(quota_table);
  const int count = static_cast<int>(infos.size());
  if (square) {
    launch_threshold_mask<true>(info_ptr, quota_ptr, count, units, st, thr, bits.data_ptr<uint8_t>(), opts);
  } else {
    launch_threshold_mask<false>(info_ptr, quota_ptr, count, units, st, thr, bits.data_ptr<uint8_t>(), opts);
  }
  return bits;
}

at::Tensor select_mask_cuda(at::TensorList scores, at::IntArrayRef bit_offsets, int64_t mask_bytes, int64_t k,
                            bool square) {
  const int64_t n = validate_select_mask(kSelectOp, scores, bit_offsets, mask_bytes, k, /*allow_double=*/false);
  TORCH_CHECK_VALUE(!scores.empty(), kSelectOp, ": expected at least one scores tensor");
  const at::Device device = scores[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().device(device);
  at::Tensor bits = at::zeros({mask_bytes}, opts.dtype(at::kByte));
  if (k == 0) return bits;
  const KeyTable keys = key_table(scores, bit_offsets);
  const std::vector<KeyInfo>& infos = keys.infos;
  const int64_t units = keys.units;
  const at::Tensor table = upload_table(infos, device);
  at::Tensor state = at::empty({static_cast<int64_t>(sizeof(SelectState))}, opts.dtype(at::kByte));
  auto* st = reinterpret_cast<SelectState*>(state.data_ptr<uint8_t>());
  const auto* info_ptr = table_ptr<KeyInfo>(table);
  const int count = static_cast<int>(infos.size());
  if (square) {
    launch_select<true>(info_ptr, count, units, n, k, st, bits.data_ptr<uint8_t>(), opts);
  } else {
    launch_select<false>(info_ptr, count, units, n, k, st, bits.data_ptr<uint8_t>(), opts);
  }
  return bits;
}

__global__ void block_popcount_kernel(const uint8_t* bits, int64_t n_blocks, long long* counts) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n_blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4* p = reinterpret_cast<const uint4*>(bits + b * kMaskAlignBytes);
    int c = 0;
#pragma unroll
    for (int j = 0; j < static_cast<int>(kMaskAlignBytes / 16); ++j) {
      const uint4 v = p[j];
      c += __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
    }
    counts[b] = c;
  }
}

at::Tensor mask_block_prefix_cuda(const at::Tensor& bits_in) {
  validate_mask_bits("fsam_kernels::mask_block_prefix", bits_in);
  const c10::cuda::CUDAGuard guard(bits_in.device());
  const at::Tensor bits = aligned16(bits_in.data_ptr()) ? bits_in : bits_in.clone();
  const int64_t n_blocks = bits.numel() / kMaskAlignBytes;
  at::Tensor prefix = at::zeros({n_blocks + 1}, bits.options().dtype(at::kLong));
  if (n_blocks == 0) return prefix;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::empty({n_blocks}, bits.options().dtype(at::kLong));
  auto* c = reinterpret_cast<long long*>(counts.data_ptr<int64_t>());
  block_popcount_kernel<<<grid_for((n_blocks + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      bits.data_ptr<uint8_t>(), n_blocks, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto* out = reinterpret_cast<long long*>(prefix.data_ptr<int64_t>()) + 1;
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, c, out, n_blocks, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, bits.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.data_ptr(), temp_bytes, c, out, n_blocks, stream));
  return prefix;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CUDA, m) {
  m.impl("select_mask", &select_mask_cuda);
  m.impl("key_histogram", &key_histogram_cuda);
  m.impl("mask_from_threshold", &mask_from_threshold_cuda);
  m.impl("mask_block_prefix", &mask_block_prefix_cuda);
}

}  // namespace cuda
}  // namespace fsam
