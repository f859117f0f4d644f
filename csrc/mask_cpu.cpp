// Global top-k mask on the CPU: exact radix select over the selection keys (11 + 11 + 10 bits, one
// histogram pass each), then one pass that counts the keys equal to the threshold per chunk (their
// global order decides ties) and one that writes the packed bits. No copy of the scores is made.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>

#include "checks.h"
#include "cpu_common.h"

namespace fsam {
namespace cpu {
namespace {

constexpr const char* kSelectOp = "fsam_kernels::select_mask";

// Calls f(i, key) for every element i of chunk `ch` of `scores`.
template <typename F>
void for_each_key(at::TensorList scores, bool square, const Chunk& ch, const F& f) {
  dispatch_float(scores[ch.t].scalar_type(), kSelectOp, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* s = static_cast<const T*>(scores[ch.t].data_ptr());
    if (square) {
      for (int64_t i = ch.begin; i < ch.end; ++i) f(i, select_key<true>(s[i]));
    } else {
      for (int64_t i = ch.begin; i < ch.end; ++i) f(i, select_key<false>(s[i]));
    }
  });
}

struct RadixPass {
  int shift;
  int width;
};
constexpr std::array<RadixPass, 3> kPasses = {{{21, 11}, {10, 11}, {0, 10}}};

inline void set_bit(uint8_t* out, at::IntArrayRef bit_offsets, const Chunk& ch, int64_t i) {
  const int64_t b = bit_offsets[ch.t] + i;
  out[b >> 3] |= static_cast<uint8_t>(1u << (b & 7));  // chunks own whole bytes: no race
}

// Keys equal to `threshold` before each chunk (chunks are in global order), counted from the first
// chunk, or with `per_tensor` from the first chunk of the chunk's tensor.
std::vector<int64_t> ties_before_chunks(at::TensorList scores, bool square, const std::vector<Chunk>& chunks,
                                        uint32_t threshold, bool per_tensor) {
  std::vector<int64_t> ties(chunks.size(), 0);
  for_each_chunk(chunks, [&](int64_t c) {
    int64_t count = 0;
    for_each_key(scores, square, chunks[c], [&](int64_t, uint32_t u) { count += (u == threshold); });
    ties[c] = count;
  });
  int64_t running = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (per_tensor && (c == 0 || chunks[c].t != chunks[c - 1].t)) running = 0;
    const int64_t here = ties[c];
    ties[c] = running;
    running += here;
  }
  return ties;
}

// The bits of the keys above `threshold` and of the ties whose rank, counted from ties_before[c], is
// below quota_of(chunk): the lowest bit indices win.
template <typename Quota>
void write_threshold_mask(at::TensorList scores, bool square, const std::vector<Chunk>& chunks, uint32_t threshold,
                          const std::vector<int64_t>& ties_before, const Quota& quota_of, at::IntArrayRef bit_offsets,
                          uint8_t* out) {
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    int64_t rank = ties_before[c];
    const int64_t quota = quota_of(ch);
    if (rank >= quota) {  // no tie of this chunk is taken
      for_each_key(scores, square, ch, [&](int64_t i, uint32_t u) {
        if (u > threshold) set_bit(out, bit_offsets, ch, i);
      });
      return;
    }
    for_each_key(scores, square, ch, [&](int64_t i, uint32_t u) {
      if (u > threshold || (u == threshold && rank++ < quota)) set_bit(out, bit_offsets, ch, i);
    });
  });
}

at::Tensor select_mask_cpu(at::TensorList scores, at::IntArrayRef bit_offsets, int64_t mask_bytes, int64_t k,
                           bool square) {
  const int64_t n = validate_select_mask(kSelectOp, scores, bit_offsets, mask_bytes, k, /*allow_double=*/true);
  at::Tensor bits = at::zeros({mask_bytes}, at::TensorOptions().dtype(at::kByte));
  if (k == 0) return bits;
  uint8_t* out = bits.data_ptr<uint8_t>();
  const auto chunks = make_chunks(scores);
  if (k == n) {
    for_each_chunk(chunks, [&](int64_t c) {
      for (int64_t i = chunks[c].begin; i < chunks[c].end; ++i) set_bit(out, bit_offsets, chunks[c], i);
    });
    return bits;
  }

  // Radix select: after the passes, `prefix` is the k-th largest key and `remaining` the number of
  // keys equal to it that belong to the top k.
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t remaining = k;
  for (const RadixPass& pass : kPasses) {
    const int64_t n_bins = int64_t{1} << pass.width;
    const uint32_t digit_mask = static_cast<uint32_t>(n_bins - 1);
    std::vector<int64_t> hist(n_bins, 0);
    std::mutex merge;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      std::vector<int64_t> local(n_bins, 0);
      for (int64_t c = b; c < e; ++c) {
        for_each_key(scores, square, chunks[c], [&](int64_t, uint32_t u) {
          if ((u & prefix_mask) == prefix) ++local[(u >> pass.shift) & digit_mask];
        });
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t d = 0; d < n_bins; ++d) hist[d] += local[d];
    });
    int64_t above = 0, d = n_bins - 1;
    for (; d > 0 && above + hist[d] < remaining; --d) above += hist[d];
    remaining -= above;
    prefix |= static_cast<uint32_t>(d) << pass.shift;
    prefix_mask |= digit_mask << pass.shift;
  }
  const uint32_t threshold = prefix;
  const int64_t need = remaining;

  // Ties at the threshold go to the lowest global bit indices: each chunk knows how many come before it.
  const auto ties_before = ties_before_chunks(scores, square, chunks, threshold, /*per_tensor=*/false);
  write_threshold_mask(scores, square, chunks, threshold, ties_before, [&](const Chunk&) { return need; }, bit_offsets,
                       out);
  return bits;
}

// ---------------------------------------------------------------------------- sharded top-k primitives
// Keys here are the reference's int32 keys: key = int32(u ^ 0x80000000) for a selection key u.
constexpr const char* kHistogramOp = "fsam_kernels::key_histogram";
constexpr const char* kThresholdOp = "fsam_kernels::mask_from_threshold";

at::Tensor key_histogram_cpu(at::TensorList scores, bool square, int64_t prefix, int64_t shift, int64_t radix_bits) {
  validate_key_histogram(kHistogramOp, scores, prefix, shift, radix_bits, /*allow_double=*/true);
  const int64_t bins = int64_t{1} << radix_bits;
  const int64_t high = shift + radix_bits;
  at::Tensor out = at::zeros({static_cast<int64_t>(scores.size()), bins}, at::TensorOptions().dtype(at::kLong));
  // keys are < 2**31: no key has bits above the top digit, nor a prefix of 2**(31 - high) or more
  if (high >= 32 ? prefix != 0 : prefix >= (int64_t{1} << (31 - high))) return out;
  int64_t* rows = out.data_ptr<int64_t>();
  const auto chunks = make_chunks(scores);
  std::mutex merge;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> local(bins);
    for (int64_t c = b; c < e; ++c) {
      std::fill(local.begin(), local.end(), 0);
      for_each_key(scores, square, chunks[c], [&](int64_t, uint32_t u) {
        const int64_t key = static_cast<int32_t>(u ^ 0x80000000u);
        if (key >= 0 && (high >= 32 || (key >> high) == prefix)) ++local[(key >> shift) & (bins - 1)];
      });
      std::lock_guard<std::mutex> lock(merge);
      int64_t* row = rows + chunks[c].t * bins;
      for (int64_t d = 0; d < bins; ++d) row[d] += local[d];
    }
  });
  return out;
}

at::Tensor mask_from_threshold_cpu(at::TensorList scores, at::IntArrayRef bit_offsets, int64_t mask_bytes, bool square,
                                   int64_t threshold, at::IntArrayRef quotas) {
  validate_mask_from_threshold(kThresholdOp, scores, bit_offsets, mask_bytes, threshold, quotas, /*allow_double=*/true);
  at::Tensor bits = at::zeros({mask_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* out = bits.data_ptr<uint8_t>();
  const uint32_t thr = static_cast<uint32_t>(threshold) ^ 0x80000000u;  // in the selection-key order
  const auto chunks = make_chunks(scores);
  const auto ties_before = ties_before_chunks(scores, square, chunks, thr, /*per_tensor=*/true);
  write_threshold_mask(scores, square, chunks, thr, ties_before, [&](const Chunk& ch) { return quotas[ch.t]; },
                       bit_offsets, out);
  return bits;
}

at::Tensor mask_block_prefix_cpu(const at::Tensor& bits) {
  validate_mask_bits("fsam_kernels::mask_block_prefix", bits);
  const int64_t n_blocks = bits.numel() / kMaskAlignBytes;
  at::Tensor prefix = at::empty({n_blocks + 1}, bits.options().dtype(at::kLong));
  const uint8_t* b = bits.data_ptr<uint8_t>();
  int64_t* p = prefix.data_ptr<int64_t>();
  // Popcounts in parallel, then a sequential scan over the (64x smaller) block array.
  at::parallel_for(0, n_blocks, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      int64_t count = 0;
      for (int64_t w = 0; w < kMaskAlignBytes / 8; ++w) {
        uint64_t word;
        std::memcpy(&word, b + blk * kMaskAlignBytes + w * 8, sizeof(word));
        count += __builtin_popcountll(word);
      }
      p[blk + 1] = count;
    }
  });
  p[0] = 0;
  for (int64_t blk = 0; blk < n_blocks; ++blk) p[blk + 1] += p[blk];
  return prefix;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam_kernels, CPU, m) {
  m.impl("select_mask", &select_mask_cpu);
  m.impl("key_histogram", &key_histogram_cpu);
  m.impl("mask_from_threshold", &mask_from_threshold_cpu);
  m.impl("mask_block_prefix", &mask_block_prefix_cpu);
}

}  // namespace cpu
}  // namespace fsam
