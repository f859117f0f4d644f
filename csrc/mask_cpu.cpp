// Global top-k mask on the CPU: exact radix select over the selection keys. One histogram pass over
// the top 11 bits; then, when that bin holds few keys (the usual case), one pass copies them and the
// selection finishes in memory, otherwise two more histogram passes (11 + 10 bits) finish it without
// a copy. A pass that counts the keys equal to the threshold per chunk (their global order decides
// ties) runs only when some of them are left out; a last pass writes the packed bits.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <mutex>

#include "checks.h"
#include "cpu_common.h"

namespace fsam {
namespace cpu {
namespace {

constexpr const char* kSelectOp = "fsam_kernels::select_mask";

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the packed mask is written as little-endian 64-bit words");

// Calls f(base, keys, len) for the keys of chunk `ch` of `scores` in blocks of up to 64: keys[j] is
// the key of element base + j. Converting a whole block first lets the compiler vectorise it, and a
// block is one 64-bit word of the mask: chunks start at mask blocks, so (bit offset + base) is a
// multiple of 64.
template <typename F>
void for_each_key_block(at::TensorList scores, bool square, const Chunk& ch, const F& f) {
  dispatch_float(scores[ch.t].scalar_type(), kSelectOp, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* s = static_cast<const T*>(scores[ch.t].data_ptr());
    uint32_t keys[64];
    for (int64_t base = ch.begin; base < ch.end; base += 64) {
      const int len = static_cast<int>(std::min<int64_t>(64, ch.end - base));
      if (square) {
        for (int j = 0; j < len; ++j) keys[j] = select_key<true>(s[base + j]);
      } else {
        for (int j = 0; j < len; ++j) keys[j] = select_key<false>(s[base + j]);
      }
      f(base, static_cast<const uint32_t*>(keys), len);
    }
  });
}

// Stores the mask word of elements [base, base + 64) of chunk `ch`'s tensor (bits past its end are 0).
inline void store_word(uint8_t* out, at::IntArrayRef bit_offsets, const Chunk& ch, int64_t base, uint64_t word) {
  std::memcpy(out + ((bit_offsets[ch.t] + base) >> 3), &word, sizeof(word));  // chunks own whole words: no race
}

struct RadixPass {
  int shift;
  int width;
};
constexpr std::array<RadixPass, 3> kPasses = {{{21, 11}, {10, 11}, {0, 10}}};

// Keys equal to `threshold` before each chunk (chunks are in global order), counted from the first
// chunk, or with `per_tensor` from the first chunk of the chunk's tensor.
std::vector<int64_t> ties_before_chunks(at::TensorList scores, bool square, const std::vector<Chunk>& chunks,
                                        uint32_t threshold, bool per_tensor) {
  std::vector<int64_t> ties(chunks.size(), 0);
  for_each_chunk(chunks, [&](int64_t c) {
    int64_t count = 0;
    for_each_key_block(scores, square, chunks[c], [&](int64_t, const uint32_t* keys, int len) {
      for (int j = 0; j < len; ++j) count += (keys[j] == threshold);
    });
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
    if (rank >= quota) {  // no tie of this chunk is taken: no branch per element
      for_each_key_block(scores, square, ch, [&](int64_t base, const uint32_t* keys, int len) {
        uint64_t word = 0;
        for (int j = 0; j < len; ++j) word |= static_cast<uint64_t>(keys[j] > threshold) << j;
        store_word(out, bit_offsets, ch, base, word);
      });
      return;
    }
    for_each_key_block(scores, square, ch, [&](int64_t base, const uint32_t* keys, int len) {
      uint64_t word = 0, equal = 0;
      for (int j = 0; j < len; ++j) {
        word |= static_cast<uint64_t>(keys[j] > threshold) << j;
        equal |= static_cast<uint64_t>(keys[j] == threshold) << j;
      }
      for (; equal != 0 && rank < quota; ++rank) {  // the block's ties, lowest index first
        word |= equal & (~equal + 1);
        equal &= equal - 1;
      }
      store_word(out, bit_offsets, ch, base, word);
    });
  });
}

// Histogram of digit (u >> shift) & (2**width - 1) over the keys u with (u & prefix_mask) == prefix.
std::vector<int64_t> radix_histogram(at::TensorList scores, bool square, const std::vector<Chunk>& chunks,
                                     uint32_t prefix, uint32_t prefix_mask, const RadixPass& pass) {
  const int64_t n_bins = int64_t{1} << pass.width;
  const uint32_t digit_mask = static_cast<uint32_t>(n_bins - 1);
  std::vector<int64_t> hist(n_bins, 0);
  std::mutex merge;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    // Four 32-bit sub-histograms (a chunk has < 2**32 keys), element j into lane j % 4: runs of equal
    // digits (common: scores cluster) then do not wait on each other's increments.
    std::vector<uint32_t> lanes(4 * n_bins);
    std::vector<int64_t> local(n_bins, 0);
    for (int64_t c = b; c < e; ++c) {
      std::fill(lanes.begin(), lanes.end(), 0u);
      for_each_key_block(scores, square, chunks[c], [&](int64_t, const uint32_t* keys, int len) {
        for (int j = 0; j < len; ++j) {
          const uint32_t u = keys[j];
          if ((u & prefix_mask) == prefix) ++lanes[(j & 3) * n_bins + ((u >> pass.shift) & digit_mask)];
        }
      });
      for (int64_t d = 0; d < n_bins; ++d) {
        local[d] += int64_t{lanes[d]} + lanes[n_bins + d] + lanes[2 * n_bins + d] + lanes[3 * n_bins + d];
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t d = 0; d < n_bins; ++d) hist[d] += local[d];
  });
  return hist;
}

// The keys u with (u >> shift) == top, in no particular order.
std::vector<uint32_t> gather_keys(at::TensorList scores, bool square, const std::vector<Chunk>& chunks, int shift,
                                  uint32_t top, int64_t count) {
  std::vector<uint32_t> gathered;
  gathered.reserve(count);
  std::mutex merge;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<uint32_t> local;
    for (int64_t c = b; c < e; ++c) {
      for_each_key_block(scores, square, chunks[c], [&](int64_t, const uint32_t* keys, int len) {
        uint32_t kept[64];
        int n_kept = 0;
        for (int j = 0; j < len; ++j) {  // branch-free: at a few % kept, a branch mispredicts often
          kept[n_kept] = keys[j];
          n_kept += ((keys[j] >> shift) == top);
        }
        local.insert(local.end(), kept, kept + n_kept);
      });
    }
    std::lock_guard<std::mutex> lock(merge);
    gathered.insert(gathered.end(), local.begin(), local.end());
  });
  return gathered;
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
      for (int64_t base = chunks[c].begin; base < chunks[c].end; base += 64) {
        const int64_t len = std::min<int64_t>(64, chunks[c].end - base);
        store_word(out, bit_offsets, chunks[c], base, len == 64 ? ~uint64_t{0} : (uint64_t{1} << len) - 1);
      }
    });
    return bits;
  }

  // Radix select: afterwards `threshold` is the k-th largest key, `need` the number of keys equal to
  // it that belong to the top k and `ties` the number of keys equal to it.
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t remaining = k;
  auto descend = [&](const RadixPass& pass, const std::vector<int64_t>& hist) {
    int64_t above = 0, d = static_cast<int64_t>(hist.size()) - 1;
    for (; d > 0 && above + hist[d] < remaining; --d) above += hist[d];
    remaining -= above;
    prefix |= static_cast<uint32_t>(d) << pass.shift;
    prefix_mask |= static_cast<uint32_t>(hist.size() - 1) << pass.shift;
    return hist[d];
  };
  const int64_t in_bin = descend(kPasses[0], radix_histogram(scores, square, chunks, 0, 0, kPasses[0]));
  uint32_t threshold;
  int64_t ties = 0;
  if (in_bin <= std::max<int64_t>(n / 8, int64_t{1} << 16)) {
    // The usual case: the first digit leaves few keys (for Gaussian-like scores a few %). Copy them
    // (at most an eighth of the scores' fp32 size) and select among them in memory: one read of the
    // scores instead of two more histogram passes.
    std::vector<uint32_t> keys = gather_keys(scores, square, chunks, kPasses[0].shift, prefix >> kPasses[0].shift,
                                             in_bin);
    std::nth_element(keys.begin(), keys.begin() + (remaining - 1), keys.end(), std::greater<uint32_t>());
    threshold = keys[remaining - 1];
    int64_t above = 0;
    for (uint32_t u : keys) {
      above += (u > threshold);
      ties += (u == threshold);
    }
    remaining -= above;
  } else {  // e.g. an all-zero Fisher: every key in one bin; no copy, two more histogram passes
    for (size_t p = 1; p < kPasses.size(); ++p) {
      ties = descend(kPasses[p], radix_histogram(scores, square, chunks, prefix, prefix_mask, kPasses[p]));
    }
    threshold = prefix;
  }
  const int64_t need = remaining;
  if (need == ties) {
    // Every key equal to the threshold is taken: the mask is the keys above threshold - 1, no tie
    // ranks needed (threshold > 0 here, as a threshold of 0 would take every key: k == n).
    const std::vector<int64_t> no_ties(chunks.size(), 0);
    write_threshold_mask(scores, square, chunks, threshold - 1, no_ties, [](const Chunk&) { return int64_t{0}; },
                         bit_offsets, out);
    return bits;
  }
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
      for_each_key_block(scores, square, chunks[c], [&](int64_t, const uint32_t* keys, int len) {
        for (int j = 0; j < len; ++j) {
          const int64_t key = static_cast<int32_t>(keys[j] ^ 0x80000000u);
          if (key >= 0 && (high >= 32 || (key >> high) == prefix)) ++local[(key >> shift) & (bins - 1)];
        }
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
