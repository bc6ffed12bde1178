// DPE decode attention over a paged KV cache on the CPU: header-only,
// torch-free.
//
//   dpe::Status dpe::paged_decode_cpu(const PagedDecodeParams&, float* partial,
//                                     int num_threads = 0);
//
// One query per sequence b, at position L_b - 1 (L_b = seq_lens[b]); the
// method's two attentions (docs/method.md) in ONE softmax: keys at distance < window (positions
// [L_b - w, L_b)) score q_normal . k_normal, the keys before them
// q_scaled . k_scaled; every score is multiplied by `scale`; the output is the
// softmax-weighted sum of v, and lse = log sum exp(score) (natural log,
// float32), -inf with out 0 for a sequence with no key (L_b = 0). This equals
// the window pass and the scaled pass merged by log-sum-exp.
//
// Performance choices (keep them):
//   * the unit of work is (sequence, KV head, key split): each K and V row is
//     read from memory once for all n_rep query heads of its KV head (GQA),
//     and a long context is cut into splits so that B * H_k small batches
//     still feed every thread (flash-decoding); the splits' partial results
//     (running max, sum, unnormalised output) are merged at the end;
//   * keys are walked block by block through the block table, in place in the
//     cache: no gather, no copy;
//   * each split is an online softmax over chunks of kChunk keys: scores of a
//     chunk first (dot products vectorised over 16 float lanes, then a lane
//     sum), one rescale of the accumulators per chunk, then p * v;
//   * the body is compiled three times (baseline, AVX2+FMA, AVX-512) and picked
//     by CPU features, as the rope kernel is (dpe/rope_cpu.h).
//
// Values the kernel reads on the host (block ids, sequence lengths) are
// checked as they are read: a block id outside [0, num_blocks) or a sequence
// longer than its block-table row makes the call return kInvalidValue (no
// out-of-bounds read; the outputs are then unspecified).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "dpe/common.h"

namespace dpe {

/// Strides (elements) of a [B, H, D] tensor (one query row per sequence).
/// The head_dim stride is 1.
struct QueryStrides {
  int64_t seq = 0;   ///< between sequences
  int64_t head = 0;  ///< between heads of one sequence
};

/// Arguments of the paged decode attention. Host memory.
struct PagedDecodeParams {
  const void* q_normal = nullptr;  ///< [B, H_q, D] dtype
  QueryStrides qn_strides;
  const void* q_scaled = nullptr;  ///< [B, H_q, D] dtype
  QueryStrides qs_strides;
  const void* k_cache = nullptr;   ///< [num_blocks, block_size, H_k, D] dtype: k_normal
  CacheStrides k_strides;
  const void* ks_cache = nullptr;  ///< [num_blocks, block_size, H_ks, D] dtype: k_scaled; H_ks in {H_k, H_q}
  CacheStrides ks_strides;
  const void* v_cache = nullptr;   ///< [num_blocks, block_size, H_k, Dv] dtype
  CacheStrides v_strides;
  const void* block_table = nullptr;  ///< [B, max_blocks] index_type: physical block of logical block j
  int64_t block_table_stride = 0;     ///< between sequences (elements); the block stride is 1
  int64_t max_blocks = 0;             ///< columns of the block table
  const void* seq_lens = nullptr;     ///< [B] index_type, contiguous: keys of each sequence
  float* out = nullptr;  ///< [B, H_q, Dv] float32, contiguous
  float* lse = nullptr;  ///< [B, H_q] float32, contiguous

  int64_t batch = 0, heads_q = 0, heads_k = 0, heads_ks = 0, head_dim = 0, v_head_dim = 0;
  int64_t num_blocks = 0, block_size = 0;
  int64_t window = 1;        ///< w >= 1
  int64_t max_seqlen_k = 0;  ///< >= every seq_lens[b] (the caller's bound: sizes the splits)
  float scale = 1.0f;        ///< softmax scale
  DType dtype = DType::kFloat32;
  IndexType index_type = IndexType::kInt32;  ///< of block_table and seq_lens
};

/// Validation that reads no tensor value.
inline Status validate_paged_decode(const PagedDecodeParams& p) {
  if (p.batch < 0) return error(ErrorCode::kInvalidShape, "batch: must be >= 0");
  if (p.heads_k < 1 || p.heads_q < 1 || p.heads_q % p.heads_k != 0)
    return error(ErrorCode::kInvalidHeads, "heads_q: must be a positive multiple of heads_k");
  if (p.heads_ks != p.heads_k && p.heads_ks != p.heads_q)
    return error(ErrorCode::kInvalidHeads, "heads_ks: must be heads_k or heads_q");
  if (p.head_dim < 1 || p.v_head_dim < 1) return error(ErrorCode::kInvalidShape, "head_dim: must be >= 1");
  if (p.block_size < 1) return error(ErrorCode::kInvalidShape, "block_size: must be >= 1");
  if (p.num_blocks < 0 || p.max_blocks < 0 || p.max_seqlen_k < 0)
    return error(ErrorCode::kInvalidShape, "num_blocks / max_blocks / max_seqlen_k: must be >= 0");
  if (p.window < 1) return error(ErrorCode::kInvalidWindow, "window: must be >= 1");
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale))
    return error(ErrorCode::kInvalidValue, "scale: must be finite and > 0");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return error(ErrorCode::kInvalidEnum, "dtype: unknown");
  if (p.index_type != IndexType::kInt32 && p.index_type != IndexType::kInt64)
    return error(ErrorCode::kInvalidEnum, "index_type: unknown");
  if (p.batch == 0) return ok_status();
  if (!p.q_normal || !p.q_scaled || !p.k_cache || !p.ks_cache || !p.v_cache || !p.block_table ||
      !p.seq_lens || !p.out || !p.lse)
    return error(ErrorCode::kNullPointer, "a tensor pointer is null");
  return ok_status();
}

namespace paged_detail {

// Keys scored together before one rescale of the accumulators.
constexpr int64_t kChunk = 32;
// 16 float lanes: one AVX-512 register, two AVX2 ones.
constexpr int64_t kLanes = 16;

// The compiled bodies (see decode_items_isa): the AVX-512 and AVX2 ones use
// intrinsics for the dot product, because a portable lane loop leaves its
// horizontal sum to the stack (measured: store-forwarding stalls dominated
// the kernel) where in-register shuffles do not. The helpers are
// plain `inline` and each body's entry is `flatten`: GCC then inlines them
// into the entry, whose target covers theirs (always_inline through a
// default-target function would not compile).
enum BodyIsa : int { kBodyGeneric = 0, kBodyAvx2 = 1, kBodyAvx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
// 16 elements at x as floats (AVX-512).
template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline __m512 load16(const scalar_t* x) {
  if constexpr (sizeof(scalar_t) == 4) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(x));
  } else if constexpr (std::is_same<scalar_t, bf16_storage>::value) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
}
// 8 elements at x as floats (AVX2).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const scalar_t* x) {
  if constexpr (sizeof(scalar_t) == 4) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(x));
  } else if constexpr (std::is_same<scalar_t, bf16_storage>::value) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  }
}
// 4 elements at x as floats (SSE, in the AVX2 target; paged_decode_rotary_cpu.h's 4-pair steps).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline __m128 load4(const scalar_t* x) {
  if constexpr (sizeof(scalar_t) == 4) {
    return _mm_loadu_ps(reinterpret_cast<const float*>(x));
  } else if constexpr (std::is_same<scalar_t, bf16_storage>::value) {
    const __m128i u = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
    return _mm_castsi128_ps(_mm_slli_epi32(u, 16));
  } else {
    return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
  }
}

template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"))) inline float dot_row_avx512(
    const float* __restrict q, const scalar_t* __restrict k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  // Lane sum by in-register shuffles (GCC 12's _mm512_reduce_add_ps trips
  // -Wmaybe-uninitialized in its own header).
  __m512 t = _mm512_add_ps(acc, _mm512_shuffle_f32x4(acc, acc, 0x4E));  // + the other 256-bit half
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));               // + the neighbouring 128-bit lane
  __m128 x = _mm512_castps512_ps128(t);
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  float s = _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
  for (; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline float dot_row_avx2(
    const float* __restrict q, const scalar_t* __restrict k, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float s = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
  for (; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}
#endif

template <typename scalar_t>
DPE_ALWAYS_INLINE float dot_row_generic(const float* __restrict q, const scalar_t* __restrict k, int64_t d) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += q[i + j] * static_cast<float>(k[i + j]);
  for (int64_t j = 0; i + j < d; ++j) acc[j] += q[i + j] * static_cast<float>(k[i + j]);
  // Tree sum of the lanes (halves added pairwise: vector adds of decreasing
  // width) rather than 15 dependent scalar adds.
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// exp(x) for float, branch-free so that a loop of it vectorises (std::exp
// does not without -ffast-math, which this library never uses): x = n ln2 + r
// with n = round(x / ln2) and r reduced in two steps (Cody-Waite), e^r from
// its degree-7 Taylor polynomial (|r| <= ln2 / 2: error < 2e-8 relative),
// times 2^n built in the exponent bits. Within 2 ulp of expf for x >= -87.3;
// below that (and -inf) it returns 0 (a softmax weight that small is 0 in
// float32 anyway: the largest score's weight is 1); x <= 0 only here.
DPE_ALWAYS_INLINE float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  const float v = p * bits_float(bits);
  return x < -87.0f ? 0.0f : v;
}

template <int ISA, typename scalar_t>
inline float dot_row(const float* __restrict q, const scalar_t* __restrict k, int64_t d) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (ISA == kBodyAvx512) return dot_row_avx512(q, k, d);
  if constexpr (ISA == kBodyAvx2) return dot_row_avx2(q, k, d);
#endif
  return dot_row_generic(q, k, d);
}

template <typename scalar_t>
DPE_ALWAYS_INLINE void axpy_row(float* __restrict o, float a, const scalar_t* __restrict v, int64_t d) {
  for (int64_t i = 0; i < d; ++i) o[i] += a * static_cast<float>(v[i]);
}

// Prefetch the cache lines of n elements at x (into every cache level).
template <typename scalar_t>
DPE_ALWAYS_INLINE void prefetch_row(const scalar_t* x, int64_t n) {
  const char* c = reinterpret_cast<const char*>(x);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

template <typename idx_t>
DPE_ALWAYS_INLINE int64_t load_index(const void* base, int64_t i) {
  return static_cast<int64_t>(static_cast<const idx_t*>(base)[i]);
}

// Work split: (sequence b, KV head hk, key split sp) -> a partial result for
// the n_rep query heads of hk: running max m, sum l, unnormalised output o.
struct Split {
  int64_t splits, split_keys;
};

inline Split plan_splits_dims(int64_t batch, int64_t heads_k, int64_t max_seqlen_k, int64_t block_size,
                              int64_t threads) {
  // Enough items for every thread (4x, for balance across uneven lengths),
  // never splits shorter than 256 keys (each split costs one partial result).
  const int64_t base = std::max<int64_t>(1, batch * heads_k);
  const int64_t want = std::max<int64_t>(1, (4 * threads + base - 1) / base);
  const int64_t max_splits = std::max<int64_t>(1, (max_seqlen_k + 255) / 256);
  const int64_t splits = std::min(want, max_splits);
  int64_t keys = (max_seqlen_k + splits - 1) / splits;
  keys = std::max<int64_t>(1, (keys + block_size - 1) / block_size * block_size);
  return Split{(max_seqlen_k + keys - 1) / std::max<int64_t>(1, keys), keys};
}

inline Split plan_splits(const PagedDecodeParams& p, int64_t threads) {
  return plan_splits_dims(p.batch, p.heads_k, p.max_seqlen_k, p.block_size, threads);
}

// Partial buffer layout per item: n_rep * (2 + Dv) floats: m, l, o[Dv] per head.
inline int64_t partial_floats_dims(int64_t v_head_dim) { return 2 + v_head_dim; }
inline int64_t partial_floats(const PagedDecodeParams& p) { return partial_floats_dims(p.v_head_dim); }

// Step 2 of a chunk, shared by the decode bodies: the online softmax update
// of each of the rep query heads (scores [rep][kChunk], nc used; they become
// the weights) and p * v over the chunk's nc value rows (vrow0, then every
// v_slot elements). DH > 0: Dv == DH at compile time (the output row stays in
// registers across the chunk's keys).
template <int DH, typename scalar_t>
DPE_ALWAYS_INLINE void softmax_chunk(float* scores, int64_t rep, int64_t nc, float* part, int64_t pf,
                                     int64_t Dv_rt, const scalar_t* vrow0, int64_t v_slot) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t Dv = DH > 0 ? DH : Dv_rt;
  for (int64_t r = 0; r < rep; ++r) {
    float* sc = scores + r * kChunk;
    float* pr = part + r * pf;
    float m_new = pr[0];
    for (int64_t j = 0; j < nc; ++j) m_new = std::max(m_new, sc[j]);
    const float alpha = pr[0] == kNegInf ? 0.0f : std::exp(pr[0] - m_new);
    float lsum = 0.0f;
    for (int64_t j = 0; j < nc; ++j) sc[j] = exp_nonpositive(sc[j] - m_new);
    for (int64_t j = 0; j < nc; ++j) lsum += sc[j];
    pr[0] = m_new;
    pr[1] = pr[1] * alpha + lsum;
    if (alpha != 1.0f)
      for (int64_t d = 0; d < Dv; ++d) pr[2 + d] *= alpha;
  }
  if constexpr (DH > 0) {
    for (int64_t r = 0; r < rep; ++r) {
      float o[DH];
      float* acc = part + r * pf + 2;
      for (int64_t d = 0; d < DH; ++d) o[d] = acc[d];
      const float* pw = scores + r * kChunk;
      for (int64_t j = 0; j < nc; ++j) {
        const scalar_t* vrow = vrow0 + j * v_slot;
        const float a = pw[j];
        for (int64_t d = 0; d < DH; ++d) o[d] += a * static_cast<float>(vrow[d]);
      }
      for (int64_t d = 0; d < DH; ++d) acc[d] = o[d];
    }
  } else {
    for (int64_t j = 0; j < nc; ++j) {
      const scalar_t* vrow = vrow0 + j * v_slot;
      for (int64_t r = 0; r < rep; ++r) axpy_row(part + r * pf + 2, scores[r * kChunk + j], vrow, Dv);
    }
  }
}

template <int ISA, int DH, typename scalar_t, typename idx_t>
inline void decode_items_body(const PagedDecodeParams& p, const Split& sp, float* partial,
                                         int64_t item_begin, int64_t item_end,
                                         std::atomic<int>* bad) {
  // DH > 0: D == Dv == DH known at compile time (the common head sizes), so the
  // dot products unroll and each query head's output row stays in registers
  // across a chunk's keys (step 3).
  const int64_t D = DH > 0 ? DH : p.head_dim, Dv = DH > 0 ? DH : p.v_head_dim;
  const int64_t rep = p.heads_q / p.heads_k, bs = p.block_size;
  const bool per_head_ks = p.heads_ks != p.heads_k;
  const int64_t pf = partial_floats(p);
  std::vector<float> qbuf(static_cast<size_t>(2 * rep * D));  // q_normal rows | q_scaled rows (* scale)
  std::vector<float> scores(static_cast<size_t>(rep * kChunk));
  const scalar_t* qn = static_cast<const scalar_t*>(p.q_normal);
  const scalar_t* qs = static_cast<const scalar_t*>(p.q_scaled);
  const scalar_t* kc = static_cast<const scalar_t*>(p.k_cache);
  const scalar_t* ksc = static_cast<const scalar_t*>(p.ks_cache);
  const scalar_t* vc = static_cast<const scalar_t*>(p.v_cache);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t s_idx = item % sp.splits;
    const int64_t hk = (item / sp.splits) % p.heads_k;
    const int64_t b = item / (sp.splits * p.heads_k);
    float* part = partial + item * rep * pf;
    for (int64_t r = 0; r < rep; ++r) {
      part[r * pf] = kNegInf;
      std::fill(part + r * pf + 1, part + (r + 1) * pf, 0.0f);
    }
    const int64_t L = load_index<idx_t>(p.seq_lens, b);
    if (L < 0 || L > p.max_blocks * bs || L > p.max_seqlen_k) {
      bad->store(1, std::memory_order_relaxed);
      continue;
    }
    const int64_t n0 = s_idx * sp.split_keys, n1 = std::min(L, n0 + sp.split_keys);
    if (n0 >= n1) continue;
    const int64_t w_lo = L - p.window;  // keys n >= w_lo are in the window (normal positions)
    for (int64_t r = 0; r < rep; ++r) {
      const int64_t h = hk * rep + r;
      const scalar_t* a = qn + b * p.qn_strides.seq + h * p.qn_strides.head;
      const scalar_t* c = qs + b * p.qs_strides.seq + h * p.qs_strides.head;
      for (int64_t d = 0; d < D; ++d) {
        qbuf[static_cast<size_t>(r * D + d)] = static_cast<float>(a[d]) * p.scale;
        qbuf[static_cast<size_t>((rep + r) * D + d)] = static_cast<float>(c[d]) * p.scale;
      }
    }
    const char* bt_row = static_cast<const char*>(p.block_table) +
                         static_cast<size_t>(b * p.block_table_stride) * sizeof(idx_t);
    const int64_t ks_first = per_head_ks ? hk * rep : hk;  // first scaled key head of hk
    // Chunks never cross a block: one block-table read and one division per
    // chunk (64-bit divisions per key cost more than the key's arithmetic).
    for (int64_t c0 = n0; c0 < n1;) {
      const int64_t blk = c0 / bs, blk_start = blk * bs;
      const int64_t c1 = std::min(std::min(n1, c0 + kChunk), blk_start + bs), nc = c1 - c0;
      // 0. prefetch the next chunk's K and V rows. Measured without it (16K keys,
      // vLLM's head-major cache): a third slower; the rows of one head are
      // strided by the other heads' (and the other key kind's), which the
      // hardware's stream prefetchers do not follow far enough.
      if (c1 < n1) {
        const int64_t nblk = c1 / bs, nphys = load_index<idx_t>(bt_row, nblk);
        if (nphys >= 0 && nphys < p.num_blocks) {
          const int64_t e = std::min(std::min(n1, c1 + kChunk), (nblk + 1) * bs);
          for (int64_t t = c1; t < e; ++t) {
            const int64_t slot = t - nblk * bs;
            if (t >= w_lo)
              prefetch_row(kc + nphys * p.k_strides.block + slot * p.k_strides.slot + hk * p.k_strides.head, D);
            else
              prefetch_row(ksc + nphys * p.ks_strides.block + slot * p.ks_strides.slot + ks_first * p.ks_strides.head,
                           per_head_ks ? (rep - 1) * p.ks_strides.head + D : D);
            prefetch_row(vc + nphys * p.v_strides.block + slot * p.v_strides.slot + hk * p.v_strides.head, Dv);
          }
        }
      }
      const int64_t phys = load_index<idx_t>(bt_row, blk);
      if (phys < 0 || phys >= p.num_blocks) {  // unreadable: skipped, and the call fails
        bad->store(1, std::memory_order_relaxed);
        c0 = c1;
        continue;
      }
      const scalar_t* kblk = kc + phys * p.k_strides.block + hk * p.k_strides.head;
      const scalar_t* ksblk = ksc + phys * p.ks_strides.block;
      const scalar_t* vblk = vc + phys * p.v_strides.block + hk * p.v_strides.head;
      // 1. scores of the chunk's keys, for every query head of hk
      for (int64_t t = c0; t < c1; ++t) {
        const int64_t slot = t - blk_start;
        float* sc = scores.data() + (t - c0);
        if (t >= w_lo) {
          const scalar_t* krow = kblk + slot * p.k_strides.slot;
          for (int64_t r = 0; r < rep; ++r) sc[r * kChunk] = dot_row<ISA>(qbuf.data() + r * D, krow, D);
        } else {
          const scalar_t* kbase = ksblk + slot * p.ks_strides.slot;
          for (int64_t r = 0; r < rep; ++r) {
            const int64_t kh = per_head_ks ? hk * rep + r : hk;
            sc[r * kChunk] = dot_row<ISA>(qbuf.data() + (rep + r) * D, kbase + kh * p.ks_strides.head, D);
          }
        }
      }
      // 2. online softmax update per query head, then p * v
      softmax_chunk<DH>(scores.data(), rep, nc, part, pf, Dv, vblk + (c0 - blk_start) * p.v_strides.slot,
                        p.v_strides.slot);
      c0 = c1;
    }
  }
}

template <typename scalar_t, typename idx_t>
__attribute__((flatten)) void decode_items_generic(const PagedDecodeParams& p, const Split& sp, float* partial,
                                                   int64_t a, int64_t e, std::atomic<int>* bad) {
  decode_items_body<kBodyGeneric, 0, scalar_t, idx_t>(p, sp, partial, a, e, bad);
}

#ifdef DPE_HAVE_AVX2_PATH
template <int DH, typename scalar_t, typename idx_t>
__attribute__((target("avx2,fma,f16c"), flatten)) void decode_items_avx2(const PagedDecodeParams& p, const Split& sp,
                                                                          float* partial, int64_t a, int64_t e,
                                                                          std::atomic<int>* bad) {
  decode_items_body<kBodyAvx2, DH, scalar_t, idx_t>(p, sp, partial, a, e, bad);
}

template <int DH, typename scalar_t, typename idx_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"), flatten))
void decode_items_avx512(const PagedDecodeParams& p, const Split& sp, float* partial, int64_t a, int64_t e,
                         std::atomic<int>* bad) {
  decode_items_body<kBodyAvx512, DH, scalar_t, idx_t>(p, sp, partial, a, e, bad);
}
#endif

template <typename scalar_t, typename idx_t>
void decode_items_isa(const PagedDecodeParams& p, const Split& sp, float* partial, int64_t a, int64_t e,
                      std::atomic<int>* bad) {
#ifdef DPE_HAVE_AVX2_PATH
  const int64_t dh = p.head_dim == p.v_head_dim ? p.head_dim : 0;
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
      if (dh == 64) return decode_items_avx512<64, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      if (dh == 128) return decode_items_avx512<128, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      return decode_items_avx512<0, scalar_t, idx_t>(p, sp, partial, a, e, bad);
    case CpuIsa::kAvx2:
      if (dh == 64) return decode_items_avx2<64, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      if (dh == 128) return decode_items_avx2<128, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      return decode_items_avx2<0, scalar_t, idx_t>(p, sp, partial, a, e, bad);
    default: break;
  }
#endif
  decode_items_generic<scalar_t, idx_t>(p, sp, partial, a, e, bad);
}

template <typename scalar_t>
void decode_items_idx(const PagedDecodeParams& p, const Split& sp, float* partial, int64_t a, int64_t e,
                      std::atomic<int>* bad) {
  if (p.index_type == IndexType::kInt32) decode_items_isa<scalar_t, int32_t>(p, sp, partial, a, e, bad);
  else decode_items_isa<scalar_t, int64_t>(p, sp, partial, a, e, bad);
}

}  // namespace paged_detail

/// The plan of a call: how many partial results it needs (floats), for a
/// caller that provides the scratch (paged_decode_range / paged_decode_merge).
struct PagedDecodePlan {
  paged_detail::Split split;
  int64_t items;            ///< B * H_k * splits
  int64_t partial_floats;   ///< size of the scratch
};

inline PagedDecodePlan plan_paged_decode(const PagedDecodeParams& p, int64_t threads) {
  const paged_detail::Split sp = paged_detail::plan_splits(p, std::max<int64_t>(1, threads));
  const int64_t items = p.batch * p.heads_k * sp.splits;
  return PagedDecodePlan{sp, items, items * (p.heads_q / p.heads_k) * paged_detail::partial_floats(p)};
}

/// Items [begin, end) of a plan (ranges may run concurrently). Sets *bad to 1
/// on an unreadable block id or sequence length.
inline void paged_decode_range(const PagedDecodeParams& p, const PagedDecodePlan& plan, float* partial,
                               int64_t begin, int64_t end, std::atomic<int>* bad) {
  if (begin >= end) return;
  using namespace paged_detail;
  switch (p.dtype) {
    case DType::kFloat32: return decode_items_idx<CpuScalar<DType::kFloat32>::type>(p, plan.split, partial, begin, end, bad);
    case DType::kFloat16: return decode_items_idx<CpuScalar<DType::kFloat16>::type>(p, plan.split, partial, begin, end, bad);
    case DType::kBFloat16: return decode_items_idx<CpuScalar<DType::kBFloat16>::type>(p, plan.split, partial, begin, end, bad);
  }
}

/// Merge the splits' partial results (n_rep * (2 + Dv) floats per item
/// (b, hk, split): m, l, o[Dv] per query head) of sequences [b_begin, b_end)
/// into out [B, H_q, Dv] and lse [B, H_q] (log-sum-exp over splits). Shared by
/// the paged decode kernels.
inline void merge_split_partials(int64_t heads_q, int64_t heads_k, int64_t Dv, int64_t ns, const float* partial,
                                 float* out_all, float* lse_all, int64_t b_begin, int64_t b_end) {
  const int64_t rep = heads_q / heads_k, pf = 2 + Dv;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t h = 0; h < heads_q; ++h) {
      const int64_t hk = h / rep, r = h % rep;
      float m = kNegInf;
      for (int64_t s = 0; s < ns; ++s) m = std::max(m, partial[((b * heads_k + hk) * ns + s) * rep * pf + r * pf]);
      float* o = out_all + (b * heads_q + h) * Dv;
      std::fill(o, o + Dv, 0.0f);
      if (m == kNegInf) {  // no key: out 0, lse -inf
        lse_all[b * heads_q + h] = kNegInf;
        continue;
      }
      float l = 0.0f;
      for (int64_t s = 0; s < ns; ++s) {
        const float* pr = partial + ((b * heads_k + hk) * ns + s) * rep * pf + r * pf;
        if (pr[0] == kNegInf) continue;
        const float wgt = std::exp(pr[0] - m);
        l += pr[1] * wgt;
        for (int64_t d = 0; d < Dv; ++d) o[d] += pr[2 + d] * wgt;
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
      lse_all[b * heads_q + h] = m + std::log(l);
    }
  }
}

/// Merge the splits' partial results of sequences [b_begin, b_end) into out
/// and lse (log-sum-exp over splits).
inline void paged_decode_merge(const PagedDecodeParams& p, const PagedDecodePlan& plan,
                               const float* partial, int64_t b_begin, int64_t b_end) {
  merge_split_partials(p.heads_q, p.heads_k, p.v_head_dim, plan.split.splits, partial, p.out, p.lse, b_begin, b_end);
}

/// The whole op on the calling thread(s): validate, plan, run every item
/// (OpenMP threads when compiled with OpenMP), merge. `num_threads` as for
/// rope_cpu.
inline Status paged_decode_cpu(const PagedDecodeParams& p, int num_threads = 0) {
  Status st = validate_paged_decode(p);
  if (!st.ok()) return st;
  if (p.batch == 0) return ok_status();
  int64_t threads = 1;
#if defined(_OPENMP)
  threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif
  const PagedDecodePlan plan = plan_paged_decode(p, threads);
  std::vector<float> partial(static_cast<size_t>(plan.partial_floats));
  std::atomic<int> bad{0};
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads)) if (threads > 1)
#endif
  for (int64_t i = 0; i < plan.items; ++i) paged_decode_range(p, plan, partial.data(), i, i + 1, &bad);
  if (bad.load())
    return error(ErrorCode::kInvalidValue,
                 "block_table / seq_lens: a block id is outside the cache or a sequence is longer "
                 "than its block-table row or max_seqlen_k");
  paged_decode_merge(p, plan, partial.data(), 0, p.batch);
  return ok_status();
}

}  // namespace dpe
