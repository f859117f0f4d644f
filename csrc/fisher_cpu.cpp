// Fisher accumulation on the CPU: accum[i] += fl32(g_i * g_i), two roundings (built with
// -ffp-contract=off so the compiler never fuses them).
#include <torch/library.h>

#include "checks.h"
#include "cpu_common.h"

namespace fsam {
namespace cpu {
namespace {

void fisher_accumulate_cpu(at::TensorList accum, at::TensorList grads) {
  constexpr const char* op = "fsam_kernels::fisher_accumulate";
  validate_fisher_accumulate(op, accum, grads, /*allow_double=*/true);
  const auto chunks = make_chunks(accum);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    float* a = accum[ch.t].data_ptr<float>();
    dispatch_float(grads[ch.t].scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* g = static_cast<const T*>(grads[ch.t].data_ptr());
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        const float gf = static_cast<float>(g[i]);
        const float sq = gf * gf;
        a[i] = a[i] + sq;
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CPU, m) {
  m.impl("fisher_accumulate", &fisher_accumulate_cpu);
}

}  // namespace cpu
}  // namespace fsam
