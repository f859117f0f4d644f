// Fisher accumulation on CUDA: accum[i] += fl32(g_i * g_i) over a whole tensor list in one launch.
// __fmul_rn / __fadd_rn keep the two roundings of the reference (no fused multiply-add).
#include <torch/library.h>

#include "checks.h"
#include "cuda_common.cuh"

namespace fsam {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kUnit = kThreads * 8;  // elements per unit: 8 per thread

struct FisherInfo {
  float* accum;
  const void* grad;
  int64_t numel;
  int64_t unit_start;
  int32_t grad_dtype;
  int32_t vectorized;  // both pointers 16-byte aligned
};

template <typename G>
__device__ __forceinline__ void accumulate8(float* a, const G* g, int64_t i, int64_t numel, bool vectorized) {
  if (vectorized && i + 8 <= numel) {
    float av[8], gv[8];
    load8(a + i, av);
    load8(g + i, gv);
#pragma unroll
    for (int j = 0; j < 8; ++j) av[j] = __fadd_rn(av[j], __fmul_rn(gv[j], gv[j]));
    store8(a + i, av);
    return;
  }
  for (int64_t j = i; j < min(i + 8, numel); ++j) {
    const float gf = static_cast<float>(g[j]);
    a[j] = __fadd_rn(a[j], __fmul_rn(gf, gf));
  }
}

__global__ void __launch_bounds__(kThreads) fisher_accumulate_kernel(const FisherInfo* infos, int n_tensors,
                                                                      int64_t n_units) {
  for (int64_t u = blockIdx.x; u < n_units; u += gridDim.x) {
    const int t = find_tensor(infos, n_tensors, u);
    const FisherInfo info = infos[t];
    const int64_t i = (u - info.unit_start) * kUnit + threadIdx.x * 8;
    if (i >= info.numel) continue;
    dispatch_dtype(info.grad_dtype, [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      accumulate8(info.accum, static_cast<const G*>(info.grad), i, info.numel, info.vectorized);
    });
  }
}

void fisher_accumulate_cuda(at::TensorList accum, at::TensorList grads) {
  validate_fisher_accumulate("fsam_kernels::fisher_accumulate", accum, grads, /*allow_double=*/false);
  if (accum.empty()) return;
  const c10::cuda::CUDAGuard guard(accum[0].device());
  std::vector<FisherInfo> infos;
  int64_t units = 0;
  for (size_t t = 0; t < accum.size(); ++t) {
    const int64_t n = accum[t].numel();
    if (n == 0) continue;
    float* a = accum[t].data_ptr<float>();
    const void* g = grads[t].data_ptr();
    infos.push_back({a, g, n, units, dtype_code(grads[t].scalar_type()), aligned16(a) && aligned16(g)});
    units += (n + kUnit - 1) / kUnit;
  }
  if (infos.empty()) return;
  const at::Tensor table = cached_table(infos, accum[0].device());
  fisher_accumulate_kernel<<<grid_for(units), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      table_ptr<FisherInfo>(table), static_cast<int>(infos.size()), units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CUDA, m) {
  m.impl("fisher_accumulate", &fisher_accumulate_cuda);
}

}  // namespace cuda
}  // namespace fsam
