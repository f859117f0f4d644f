// Gradient norm, masked perturbation and exact restore on CUDA, each over the whole tensor list.
//
// grad_norm: per-block partial sums of squares, then one block adds them in fp64 and takes the root:
// deterministic and without host synchronisation. Each square of the fp32 product is exact in fp64
// and summed there, so the fp32 norm is the CPU kernels' and Triton's bit for bit.
// perturb / restore: one warp per 512-element mask block. The block's first compact saved position is
// read from the per-block prefix counts; inside the block, the rank of an element among the set bits
// is a popcount of the mask word below its lane. Both read the norm on the device and do nothing when
// it is not finite. Arithmetic uses __fmul_rn / __fadd_rn / __frcp_rn: the reference's roundings
// (scale = fl32(1 / (norm + eps)) * fl32(rho): a correctly rounded reciprocal, then one multiply).
// Each tensor's originals are a range of its dtype's compact buffer, of saved_counts[t] elements
// (checked on the host, like the CPU path); the kernel's slot bound only keeps counts that disagree
// with the mask inside that range.
#include <cub/block/block_reduce.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_common.cuh"

namespace fsam {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------- grad norm
constexpr int64_t kNormUnit = kThreads * 8;

struct NormInfo {
  const void* param;
  const void* grad;
  int64_t numel;
  int64_t unit_start;
  int32_t param_dtype;
  int32_t grad_dtype;
  int32_t adaptive;
  int32_t vectorized;
};

template <typename T>
__device__ __forceinline__ void load8_any(const T* p, int64_t i, int64_t numel, bool vectorized, float (&v)[8]) {
  if (vectorized && i + 8 <= numel) {
    load8(p + i, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i + j < numel ? static_cast<float>(p[i + j]) : 0.f;
  }
}

__global__ void __launch_bounds__(kThreads) grad_norm_partial_kernel(const NormInfo* infos, int n_tensors,
                                                                      int64_t n_units, double* partial) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  double acc = 0.0;
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const NormInfo info = infos[find_tensor(infos, n_tensors, u)];
    const int64_t i = (u - info.unit_start) * kNormUnit + threadIdx.x * 8;
    if (i >= info.numel) continue;
    float g[8];
    dispatch_dtype(info.grad_dtype, [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      load8_any(static_cast<const G*>(info.grad), i, info.numel, info.vectorized, g);
    });
    float w[8] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
    if (info.adaptive) {
      dispatch_dtype(info.param_dtype, [&](auto* tag) {
        using W = std::remove_pointer_t<decltype(tag)>;
        load8_any(static_cast<const W*>(info.param), i, info.numel, info.vectorized, w);
      });
    }
    // The norm rule (docs/backends.md): v = fl32(|w| * g), its square exact in fp64 (no overflow for
    // finite inputs: the reference's skip rule), summed in fp64.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const double v = static_cast<double>(__fmul_rn(fabsf(w[j]), g[j]));
      acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
  }
  const double total = Reduce(storage).Sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kThreads) grad_norm_final_kernel(const double* partial, int n, float* out) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kThreads) acc += partial[i];
  const double total = Reduce(storage).Sum(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(sqrt(total));  // inf beyond fp32's range: the skip rule
}

at::Tensor grad_norm_cuda(at::TensorList params, const OptionalTensors& grads_in, c10::List<bool> adaptive) {
  validate_grad_norm("fsam_kernels::grad_norm", params, grads_in, adaptive.size(), /*allow_double=*/false);
  const std::vector<at::Tensor> grads = contiguous_grads(grads_in);  // kept until the launch is queued
  TORCH_CHECK_VALUE(!params.empty(), "fsam_kernels::grad_norm: expected at least one parameter");
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().device(device);
  std::vector<NormInfo> infos;
  int64_t units = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    if (n == 0 || !grads[t].defined()) continue;
    const void* w = params[t].data_ptr();
    const void* g = grads[t].data_ptr();
    infos.push_back({w, g, n, units, dtype_code(params[t].scalar_type()), dtype_code(grads[t].scalar_type()),
                     adaptive.get(t), aligned16(w) && aligned16(g)});
    units += (n + kNormUnit - 1) / kNormUnit;
  }
  if (infos.empty()) return at::zeros({}, opts.dtype(at::kFloat));
  at::Tensor out = at::empty({}, opts.dtype(at::kFloat));  // written by the final kernel: no fill kernel
  const at::Tensor table = cached_table(infos, device);
  const int grid = grid_for(units);
  at::Tensor partial = at::empty({grid}, opts.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  grad_norm_partial_kernel<<<grid, kThreads, 0, stream>>>(table_ptr<NormInfo>(table), static_cast<int>(infos.size()),
                                                          units, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_norm_final_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), grid, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------ perturb / restore
constexpr int64_t kBlock = kMaskAlignBits;  // elements per warp task: one mask block
constexpr int kWordsPerBlock = kBlock / 32;

struct PerturbInfo {
  void* param;
  const void* grad;  // unused by restore
  void* saved;
  int64_t numel;
  int64_t unit_start;
  int64_t bit_offset;  // -1: dense tensor
  int64_t saved_numel;  // saved_counts[t], validated == saved[t].numel()
  float rho;
  int32_t param_dtype;
  int32_t grad_dtype;
  int32_t adaptive;
  int32_t vectorized;  // param and grad 16-byte aligned (perturb only)
  int32_t unused = 0;  // explicit padding: every byte of a table is defined (cached_table compares them)
};
static_assert(sizeof(PerturbInfo) == 80, "PerturbInfo has no implicit padding");

// The perturbation reads a full mask block of aligned tensors as 16 consecutive elements a lane with
// 128-bit loads (perturb_block_wide), the selected ones or not; else each selected element on its own,
// coalesced across the warp. At 10 % density the whole-block loads fetch about 1.75x the fp32 sectors
// (1.2x for 16-bit types) that selected elements touch, in fewer, wider requests: which is faster is
// for a GPU to measure; false restores the element-wise loads everywhere.
constexpr bool kWideLoads = true;

struct Perturb {
  float scale;
  bool adaptive;
  template <typename W>
  __device__ __forceinline__ void apply(W* w, W* saved, int64_t e, int64_t slot, float wf, float gf) const {
    saved[slot] = static_cast<W>(wf);  // exact: wf is a W value
    const float step = adaptive ? __fmul_rn(__fmul_rn(__fmul_rn(wf, wf), gf), scale) : __fmul_rn(gf, scale);
    w[e] = static_cast<W>(__fadd_rn(wf, step));
  }
  template <typename W, typename G>
  __device__ __forceinline__ void operator()(W* w, const G* g, W* saved, int64_t e, int64_t slot) const {
    apply(w, saved, e, slot, static_cast<float>(w[e]), static_cast<float>(g[e]));
  }
};

struct Restore {
  template <typename W, typename G>
  __device__ __forceinline__ void operator()(W* w, const G*, const W* saved, int64_t e, int64_t slot) const {
    w[e] = saved[slot];
  }
};

// Visits every element of one mask block that the op touches: all elements of a dense tensor, the
// set bits of a masked one, with the element's compact slot in `saved`.
template <typename W, typename G, typename Op>
__device__ __forceinline__ void visit_block(const PerturbInfo& info, int64_t base, const uint8_t* bits,
                                            const int64_t* block_prefix, const Op& op) {
  W* w = static_cast<W*>(info.param);
  const G* g = static_cast<const G*>(info.grad);
  W* saved = static_cast<W*>(info.saved);
  const int lane = threadIdx.x & 31;
  if (info.bit_offset < 0) {
    for (int s = 0; s < kWordsPerBlock; ++s) {
      const int64_t e = base + s * 32 + lane;
      if (e < info.numel) op(w, g, saved, e, e);
    }
    return;
  }
  const uint32_t* words = reinterpret_cast<const uint32_t*>(bits + (info.bit_offset + base) / 8);
  int64_t slot = block_prefix[(info.bit_offset + base) / kBlock] - block_prefix[info.bit_offset / kBlock];
  const unsigned below = lanemask_lt();
  for (int s = 0; s < kWordsPerBlock; ++s) {
    const int64_t e = base + s * 32 + lane;
    const unsigned word = words[s] & __ballot_sync(0xffffffffu, e < info.numel);
    const int64_t mine = slot + __popc(word & below);
    // Always in range when saved_counts agree with the mask (validated sizes); else stay in bounds.
    if (((word >> lane) & 1u) && static_cast<uint64_t>(mine) < static_cast<uint64_t>(info.saved_numel)) {
      op(w, g, saved, e, mine);
    }
    slot += __popc(word);
  }
}

// A full mask block of 16-byte aligned tensors: lane l perturbs the selected ones of elements
// base + 16l .. base + 16l + 15, read with 128-bit loads; its first slot follows the selected
// elements of the lanes below (a warp scan), in the element order of visit_block.
template <typename W, typename G>
__device__ __forceinline__ void perturb_block_wide(const PerturbInfo& info, int64_t base, const uint8_t* bits,
                                                   const int64_t* block_prefix, const Perturb& op) {
  W* w = static_cast<W*>(info.param);
  const G* g = static_cast<const G*>(info.grad);
  W* saved = static_cast<W*>(info.saved);
  const int lane = threadIdx.x & 31;
  const int64_t e0 = base + lane * 16;
  uint32_t mine = 0xffffu;  // dense: every element, its slot is its index
  int64_t slot = e0;
  if (info.bit_offset >= 0) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(bits + (info.bit_offset + base) / 8);
    mine = (words[lane >> 1] >> (16 * (lane & 1))) & 0xffffu;
    const int count = __popc(mine);
    int inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += v;
    }
    slot = block_prefix[(info.bit_offset + base) / kBlock] - block_prefix[info.bit_offset / kBlock] + inclusive - count;
  }
  if (mine == 0) return;
  float wv[2][8], gv[2][8];
  load8(w + e0, wv[0]);
  load8(w + e0 + 8, wv[1]);
  load8(g + e0, gv[0]);
  load8(g + e0 + 8, gv[1]);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    if ((mine >> j) & 1u) {
      // Always in range when saved_counts agree with the mask (validated sizes); else stay in bounds.
      if (static_cast<uint64_t>(slot) < static_cast<uint64_t>(info.saved_numel)) {
        op.apply(w, saved, e0 + j, slot, wv[j >> 3][j & 7], gv[j >> 3][j & 7]);
      }
      ++slot;
    }
  }
}

template <bool kRestore>
__global__ void __launch_bounds__(kThreads) perturb_restore_kernel(const PerturbInfo* infos, int n_tensors,
                                                                    int64_t n_units, const uint8_t* bits,
                                                                    const int64_t* block_prefix, const float* norm,
                                                                    float eps) {
  const float n = *norm;
  if (!isfinite(n)) return;  // weights untouched (perturb) / nothing to undo (restore)
  const float denom = __fadd_rn(n, eps);
  for (int64_t u = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5); u < n_units;
       u += static_cast<int64_t>(gridDim.x) * kWarps) {
    const PerturbInfo info = infos[find_tensor(infos, n_tensors, u)];
    const int64_t base = (u - info.unit_start) * kBlock;
    dispatch_dtype(info.param_dtype, [&](auto* wtag) {
      using W = std::remove_pointer_t<decltype(wtag)>;
      if constexpr (kRestore) {
        visit_block<W, W>(info, base, bits, block_prefix, Restore{});
      } else {
        dispatch_dtype(info.grad_dtype, [&](auto* gtag) {
          using G = std::remove_pointer_t<decltype(gtag)>;
          // a zero norm (an all-zero gradient) perturbs by exactly 0, whatever rho and eps (0 * inf is NaN)
          const Perturb op{n == 0.0f ? 0.0f : __fmul_rn(__frcp_rn(denom), info.rho), info.adaptive != 0};
          if (kWideLoads && info.vectorized && base + kBlock <= info.numel) {  // warp-uniform
            perturb_block_wide<W, G>(info, base, bits, block_prefix, op);
          } else {
            visit_block<W, G>(info, base, bits, block_prefix, op);
          }
        });
      }
    });
  }
}

void launch_perturb_restore(bool restore, at::TensorList params, const std::vector<at::Tensor>& grads,
                            at::TensorList saved, at::IntArrayRef saved_slots, at::IntArrayRef saved_offsets,
                            at::IntArrayRef saved_counts, const at::Tensor& bits_in, const at::Tensor& block_prefix,
                            at::IntArrayRef bit_offsets, at::ArrayRef<double> rho, const c10::List<bool>* adaptive,
                            const at::Tensor& norm, double eps) {
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor bits = (reinterpret_cast<uintptr_t>(bits_in.data_ptr()) & 3u) == 0 ? bits_in : bits_in.clone();
  std::vector<PerturbInfo> infos;
  int64_t units = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    if (n == 0 || saved_slots[t] == -1) continue;
    const int32_t wdt = dtype_code(params[t].scalar_type());
    // params[t]'s originals: a range of its dtype's compact buffer (validated: inside it, no overlap)
    void* s = static_cast<char*>(saved[saved_slots[t]].data_ptr()) + saved_offsets[t] * params[t].element_size();
    infos.push_back({params[t].data_ptr(), restore ? nullptr : grads[t].data_ptr(), s, n, units, bit_offsets[t],
                     saved_counts[t], restore ? 0.f : static_cast<float>(rho[t]), wdt,
                     restore ? wdt : dtype_code(grads[t].scalar_type()), restore ? 0 : int32_t{adaptive->get(t)},
                     !restore && aligned16(params[t].data_ptr()) && aligned16(grads[t].data_ptr())});
    units += (n + kBlock - 1) / kBlock;
  }
  if (infos.empty()) return;
  const at::Tensor table = cached_table(infos, device);
  const int grid = grid_for((units + kWarps - 1) / kWarps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = restore ? perturb_restore_kernel<true> : perturb_restore_kernel<false>;
  launch<<<grid, kThreads, 0, stream>>>(table_ptr<PerturbInfo>(table), static_cast<int>(infos.size()), units,
                                        bits.data_ptr<uint8_t>(), block_prefix.data_ptr<int64_t>(),
                                        norm.data_ptr<float>(), static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_perturb_cuda(at::TensorList params, const OptionalTensors& grads, at::TensorList saved,
                         at::IntArrayRef saved_slots, at::IntArrayRef saved_offsets, at::IntArrayRef saved_counts,
                         const at::Tensor& bits, const at::Tensor& block_prefix, at::IntArrayRef bit_offsets,
                         at::ArrayRef<double> rho, c10::List<bool> adaptive, const at::Tensor& norm, double eps) {
  validate_perturb_restore("fsam_kernels::masked_perturb", params, &grads, saved, saved_slots, saved_offsets,
                           saved_counts, bits, block_prefix, bit_offsets, rho.size(), adaptive.size(), norm,
                           /*allow_double=*/false);
  if (params.empty()) return;
  launch_perturb_restore(false, params, contiguous_grads(grads), saved, saved_slots, saved_offsets, saved_counts, bits,
                         block_prefix, bit_offsets, rho, &adaptive, norm, eps);
}

void masked_restore_cuda(at::TensorList params, at::TensorList saved, at::IntArrayRef saved_slots,
                         at::IntArrayRef saved_offsets, at::IntArrayRef saved_counts, const at::Tensor& bits,
                         const at::Tensor& block_prefix, at::IntArrayRef bit_offsets, const at::Tensor& norm) {
  validate_perturb_restore("fsam_kernels::masked_restore", params, nullptr, saved, saved_slots, saved_offsets,
                           saved_counts, bits, block_prefix, bit_offsets, params.size(), params.size(), norm,
                           /*allow_double=*/false);
  if (params.empty()) return;
  launch_perturb_restore(true, params, {}, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix,
                         bit_offsets, {}, nullptr, norm, 0.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CUDA, m) {
  m.impl("grad_norm", &grad_norm_cuda);
  m.impl("masked_perturb", &masked_perturb_cuda);
  m.impl("masked_restore", &masked_restore_cuda);
}

}  // namespace cuda
}  // namespace fsam
