// DPE decode attention over a paged cache of UNROTATED keys on the CPU, each
// key rotated as it is loaded from a float32 cos/sin table: header-only,
// torch-free.
//
//   dpe::Status dpe::paged_decode_rotary_cpu(const PagedDecodeRotaryParams&,
//                                            int num_threads = 0);
//
// The compact-cache twin of dpe/paged_decode_cpu.h (same plan / range / merge
// structure, same online softmax, same partial layout and merge). One query
// per sequence b at position m = L_b - 1 (L_b = seq_lens[b]), one DPE
// configuration per sequence (c = seq_config[b]: window w = window[c], pair
// scales s_i = pair_scale[c, i], key dimensions mask[c, h, i] per query head h,
// all pairs when there is no mask). Table row t of cos_sin holds
// cos(float32(t) * inv_freq) | sin(...) (P = rotary_dim / 2 values each);
// docs/method.md's indices (dpe_kernels/reference.py rotary_indices):
//   key n:   normal row n; scaled row (key dim ? n // s_i : n)
//   query m: normal row m; scaled row (key dim && m >= w ? m // s_i + (w - w // s_i) : m)
// Keys at distance < w (n >= L - w) score q_normal . k_normal, older ones
// q_scaled . k_scaled; scores times `scale`; out = softmax-weighted sum of v,
// lse natural log; a sequence without keys gets out 0, lse -inf.
//
// Performance choices (measured on the shared 2-core AMD EPYC, AVX2 bodies,
// SmolLM2 shapes H_q 9 / H_k 3 / D 64, 16K keys, head-major blocks of 128; see
// bench/results/paged_cpu_rotary.md: 0.3-0.5x the rotated-cache paged_decode's
// time in float32 with SmolLM2's per-query-head mask, 2-3.7x without a mask,
// where the cos/sin table rows are the extra memory traffic):
//   * a key is rotated ONCE per KV head into a float row and then dotted with
//     the n_rep query heads (rep = 3 here). The identity
//     q . rot(k, a) = sum_i cos a_i (q_i k_i + q_{i+P} k_{i+P}) + sin a_i (q_{i+P} k_i - q_i k_{i+P})
//     would spend 2 FMAs per element per query head instead of 2 per element
//     once plus 1 per element per query head: it is cheaper only for rep = 1;
//   * the query is rotated once per item (sequence, KV head, split), with
//     `scale` folded in;
//   * scaled rows: pairs of equal scale form runs (the config's groups); each
//     run keeps a running quotient n // s and remainder, advanced by one per
//     key (one division per run per item, none per key: a 64-bit division per
//     pair per key, 32 pairs, would cost several times the key's dot
//     products), and the cos | sin rows of a chunk's scaled keys are assembled
//     run by run into a buffer before the chunk's rotations read them (see
//     step 1a: store forwarding); the table rows are prefetched a chunk ahead
//     (see step 0);
//   * per-query-head mask: the fully scaled and the normal rotation of a key
//     are both formed once per KV head into one row [k_scaled | k_normal] of
//     2D floats, and each query head's scaled query is split once per item
//     into [q_s on its key pairs | q_s on its other pairs and the dims past
//     rotary_dim] (zeros elsewhere): one dot product of 2D per head, no
//     per-key select, and each K row is still read once (the rotated-cache
//     path reads n_rep scaled K rows per KV head instead);
//   * rotation in intrinsics (AVX-512: 16 pairs, AVX2: 8 then 4 per step,
//     neox layout; gptj and odd sizes by a scalar loop), bf16 / f16 widened as
//     loaded, as the dot products of paged_decode_cpu.h are, and the rotated
//     rows rounded back to the dtype before the dots (round_row: the operands
//     a rotated cache would hold);
//   * K and V rows of the next chunk are prefetched (as paged_decode_cpu.h).
//
// Values read on the host are checked as they are read: a block id outside
// [0, num_blocks), a sequence longer than its block-table row or
// max_seqlen_k (bit 1 of the failure), a seq_config outside [0, C) or a window
// or pair scale < 1 (bit 2), a sequence longer than the table (L > N: its rows
// 0 .. L - 1 are read; bit 4) make the call return kInvalidValue without any
// out-of-bounds read (outputs then unspecified).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dpe/paged_decode_cpu.h"

namespace dpe {

/// Arguments of the rotary paged decode attention. Host memory.
struct PagedDecodeRotaryParams {
  const void* q = nullptr;  ///< [B, H_q, D] dtype, unrotated
  QueryStrides q_strides;
  const void* k_cache = nullptr;  ///< [num_blocks, block_size, H_k, D] dtype, unrotated keys
  CacheStrides k_strides;
  const void* v_cache = nullptr;  ///< [num_blocks, block_size, H_k, Dv] dtype
  CacheStrides v_strides;
  const void* block_table = nullptr;  ///< [B, max_blocks] index_type
  int64_t block_table_stride = 0;     ///< between sequences (elements); the block stride is 1
  int64_t max_blocks = 0;
  const void* seq_lens = nullptr;    ///< [B] index_type, contiguous
  const void* seq_config = nullptr;  ///< [B] index_type, contiguous: configuration of each sequence
  const float* cos_sin = nullptr;    ///< [table_rows, >= rotary_dim] float32: cos | sin of row t
  int64_t table_rows = 0;
  int64_t table_stride = 0;          ///< between rows (elements); the column stride is 1
  const int64_t* pair_scale = nullptr;  ///< [C, P] contiguous
  const int64_t* window = nullptr;      ///< [C] contiguous
  const bool* mask = nullptr;           ///< [C, H_q, P] contiguous, or null (every pair a key dim)
  float* out = nullptr;  ///< [B, H_q, Dv] float32, contiguous
  float* lse = nullptr;  ///< [B, H_q] float32, contiguous

  int64_t batch = 0, heads_q = 0, heads_k = 0, head_dim = 0, v_head_dim = 0, rotary_dim = 0;
  int64_t num_configs = 0;
  int64_t num_blocks = 0, block_size = 0;
  int64_t max_seqlen_k = 0;  ///< >= every seq_lens[b]
  bool is_neox = true;
  float scale = 1.0f;
  DType dtype = DType::kFloat32;
  IndexType index_type = IndexType::kInt32;  ///< of block_table, seq_lens and seq_config
};

/// Validation that reads no tensor value.
inline Status validate_paged_decode_rotary(const PagedDecodeRotaryParams& p) {
  if (p.batch < 0) return error(ErrorCode::kInvalidShape, "batch: must be >= 0");
  if (p.heads_k < 1 || p.heads_q < 1 || p.heads_q % p.heads_k != 0)
    return error(ErrorCode::kInvalidHeads, "heads_q: must be a positive multiple of heads_k");
  if (p.head_dim < 1 || p.v_head_dim < 1) return error(ErrorCode::kInvalidShape, "head_dim: must be >= 1");
  if (p.rotary_dim < 2 || p.rotary_dim % 2 || p.rotary_dim > p.head_dim)
    return error(ErrorCode::kInvalidShape, "rotary_dim: must be even and in [2, head_dim]");
  if (p.block_size < 1) return error(ErrorCode::kInvalidShape, "block_size: must be >= 1");
  if (p.num_blocks < 0 || p.max_blocks < 0 || p.max_seqlen_k < 0 || p.table_rows < 0)
    return error(ErrorCode::kInvalidShape, "num_blocks / max_blocks / max_seqlen_k / table_rows: must be >= 0");
  if (p.num_configs < 1) return error(ErrorCode::kInvalidShape, "num_configs: must be >= 1");
  if (p.table_rows > 0 && p.table_stride < p.rotary_dim)
    return error(ErrorCode::kInvalidShape, "cos_sin: rows must hold rotary_dim values");
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale))
    return error(ErrorCode::kInvalidValue, "scale: must be finite and > 0");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return error(ErrorCode::kInvalidEnum, "dtype: unknown");
  if (p.index_type != IndexType::kInt32 && p.index_type != IndexType::kInt64)
    return error(ErrorCode::kInvalidEnum, "index_type: unknown");
  if (p.batch == 0) return ok_status();
  if (!p.q || !p.k_cache || !p.v_cache || !p.block_table || !p.seq_lens || !p.seq_config || !p.pair_scale ||
      !p.window || !p.out || !p.lse || (p.table_rows > 0 && !p.cos_sin))
    return error(ErrorCode::kNullPointer, "a tensor pointer is null");
  return ok_status();
}

/// Failure bits of a run (set as values are read).
enum RotaryBad : int { kBadBlocks = 1, kBadConfig = 2, kBadTable = 4 };

/// The message of a run's failure bits (a static string: Status holds a
/// const char*).
inline const char* rotary_bad_message(int bad) {
#define DPE_BAD_BLOCKS "block_table / seq_lens: a block id is outside the cache or a sequence is longer than its block-table row or max_seqlen_k"
#define DPE_BAD_CONFIG "seq_config / window / pair_scale: a configuration outside [0, C) or a value < 1"
#define DPE_BAD_TABLE "cos_sin: a sequence is longer than the cos_sin table (rows 0 .. seq_len - 1 are read)"
  static const char* const kMessages[8] = {
      "",
      DPE_BAD_BLOCKS,
      DPE_BAD_CONFIG,
      DPE_BAD_BLOCKS "; " DPE_BAD_CONFIG,
      DPE_BAD_TABLE,
      DPE_BAD_BLOCKS "; " DPE_BAD_TABLE,
      DPE_BAD_CONFIG "; " DPE_BAD_TABLE,
      DPE_BAD_BLOCKS "; " DPE_BAD_CONFIG "; " DPE_BAD_TABLE};
#undef DPE_BAD_BLOCKS
#undef DPE_BAD_CONFIG
#undef DPE_BAD_TABLE
  return kMessages[bad & 7];
}

namespace paged_detail {

#if defined(__x86_64__) && defined(__GNUC__)
// neox pairs [i, e) of key row k rotated by cos cs[i] / sin cs[P + i] into
// out, 16 pairs a step (AVX-512): returns the first pair left over.
template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"))) inline int64_t rotate_neox_avx512(
    const scalar_t* __restrict k, const float* __restrict cs, float* __restrict out, int64_t P, int64_t i,
    int64_t e) {
  for (; i + 16 <= e; i += 16) {
    const __m512 a = load16(k + i), b = load16(k + P + i);
    const __m512 c = _mm512_loadu_ps(cs + i), s = _mm512_loadu_ps(cs + P + i);
    _mm512_storeu_ps(out + i, _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s)));
    _mm512_storeu_ps(out + P + i, _mm512_fmadd_ps(a, s, _mm512_mul_ps(b, c)));
  }
  return i;
}
// The same, 8 then 4 pairs a step (AVX2; the 4-wide step serves the runs of
// 4 pairs a DPE configuration's groups often are).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline int64_t rotate_neox_avx2(
    const scalar_t* __restrict k, const float* __restrict cs, float* __restrict out, int64_t P, int64_t i,
    int64_t e) {
  for (; i + 8 <= e; i += 8) {
    const __m256 a = load8(k + i), b = load8(k + P + i);
    const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + P + i);
    _mm256_storeu_ps(out + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
    _mm256_storeu_ps(out + P + i, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
  }
  for (; i + 4 <= e; i += 4) {
    const __m128 a = load4(k + i), b = load4(k + P + i);
    const __m128 c = _mm_loadu_ps(cs + i), s = _mm_loadu_ps(cs + P + i);
    _mm_storeu_ps(out + i, _mm_fmsub_ps(a, c, _mm_mul_ps(b, s)));
    _mm_storeu_ps(out + P + i, _mm_fmadd_ps(a, s, _mm_mul_ps(b, c)));
  }
  return i;
}
#endif

// neox pairs [i, e) of key row k (dtype) rotated by cos cs[i] and sin
// cs[P + i] into out (float): the widest steps the body's ISA has, then a
// scalar loop. The one neox rotation: whole rows (rotate_row) and the runs
// of equal scale of a scaled key (rotate_runs_neox) both call it.
template <int ISA, typename scalar_t>
inline void rotate_neox_range(const scalar_t* __restrict k, const float* __restrict cs, float* __restrict out,
                              int64_t P, int64_t i, int64_t e) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (ISA == kBodyAvx512) i = rotate_neox_avx512(k, cs, out, P, i, e);
  if constexpr (ISA == kBodyAvx2 || ISA == kBodyAvx512) i = rotate_neox_avx2(k, cs, out, P, i, e);
#endif
  for (; i < e; ++i) {
    const float a = static_cast<float>(k[i]), b = static_cast<float>(k[P + i]);
    out[i] = a * cs[i] - b * cs[P + i];
    out[P + i] = a * cs[P + i] + b * cs[i];
  }
}

// The scaled rotation of an old key, neox layout, run by run straight from
// the table: run g's pairs read row g_q[g] (= n // s_g). Measured (2-core
// EPYC, AVX2, SmolLM2 shapes, 16K keys, no mask, preset scales: 8 runs of 4
// pairs): against assembling each key's cos | sin row pair by pair first
// (step 1a, kept for gptj) float32 B 1 8.1 -> 5.2 ms, B 8 60 -> 47 ms;
// bfloat16 B 8 51 -> 35 ms: the assembly was a scalar copy of 2P floats per
// key, more instructions than the rotation and the three dot products
// together.
template <int ISA, typename scalar_t>
inline void rotate_runs_neox(const scalar_t* __restrict k, const float* __restrict tab, int64_t ts,
                             const int64_t* g_start, const int64_t* g_len, const int64_t* g_q, int64_t G,
                             float* __restrict out, int64_t P, int64_t D) {
  for (int64_t g = 0; g < G; ++g)
    rotate_neox_range<ISA>(k, tab + g_q[g] * ts, out, P, g_start[g], g_start[g] + g_len[g]);
  for (int64_t d = 2 * P; d < D; ++d) out[d] = static_cast<float>(k[d]);
}

// Rotate the first 2P dims of key row k (dtype) by cos cs[0:P] and sin
// cs[P:2P] into out (float); dims [2P, D) are copied (widened).
template <int ISA, typename scalar_t>
inline void rotate_row(const scalar_t* __restrict k, const float* __restrict cs, float* __restrict out, int64_t P,
                       int64_t D, bool neox) {
  const float* sn = cs + P;
  if (neox) {
    rotate_neox_range<ISA>(k, cs, out, P, 0, P);
  } else {
    for (int64_t i = 0; i < P; ++i) {
      const float a = static_cast<float>(k[2 * i]), b = static_cast<float>(k[2 * i + 1]);
      out[2 * i] = a * cs[i] - b * sn[i];
      out[2 * i + 1] = a * sn[i] + b * cs[i];
    }
  }
  for (int64_t d = 2 * P; d < D; ++d) out[d] = static_cast<float>(k[d]);
}

// A 16-bit cache's rotated rows rounded to its dtype before the dot products:
// the prefill path, the Triton kernel and a rotated cache all use rotated keys
// and queries in the cache's dtype, so a decode step sees the same operands
// as they do. float32: nothing to do.
template <typename scalar_t>
inline void round_row(float* __restrict x, int64_t n) {
  if constexpr (sizeof(scalar_t) != sizeof(float)) {
    for (int64_t d = 0; d < n; ++d) x[d] = static_cast<float>(static_cast<scalar_t>(x[d]));
  }
}

// Dim of the two elements of pair i.
DPE_ALWAYS_INLINE int64_t pair_lo(int64_t i, bool neox) { return neox ? i : 2 * i; }
DPE_ALWAYS_INLINE int64_t pair_hi(int64_t i, int64_t P, bool neox) { return neox ? i + P : 2 * i + 1; }

template <int ISA, int DH, typename scalar_t, typename idx_t>
inline void rotary_items_body(const PagedDecodeRotaryParams& p, const Split& sp, float* partial, int64_t item_begin,
                              int64_t item_end, std::atomic<int>* bad) {
  const int64_t D = DH > 0 ? DH : p.head_dim, Dv = DH > 0 ? DH : p.v_head_dim;
  const int64_t rep = p.heads_q / p.heads_k, bs = p.block_size, P = p.rotary_dim / 2;
  const bool masked = p.mask != nullptr, neox = p.is_neox;
  const int64_t KW = masked ? 2 * D : D;  // scaled-key row: [k_scaled | k_normal] with a mask
  const int64_t pf = partial_floats_dims(p.v_head_dim);
  std::vector<float> qbuf(static_cast<size_t>(rep * (D + KW)));  // q_normal rows | q_scaled rows (* scale)
  std::vector<float> scores(static_cast<size_t>(rep * kChunk));
  std::vector<float> qf(static_cast<size_t>(D)), cs_q(static_cast<size_t>(2 * P));
  std::vector<float> krot(static_cast<size_t>(2 * D));
  // gptj only (neox rotates run by run from the table): the assembled cos | sin rows of a chunk's scaled keys
  std::vector<float> cs_chunk(static_cast<size_t>(neox ? 0 : kChunk * 2 * P));
  std::vector<int64_t> g_start, g_len, g_s, g_q, g_r;      // runs of equal scale: start, length, s, n // s, n % s
  // the running quotients g_q = n // s of the runs moved on to the next key (no division per key)
  const auto next_key = [&](int64_t G) {
    for (int64_t g = 0; g < G; ++g) {
      if (++g_r[g] == g_s[g]) g_r[g] = 0, ++g_q[g];
    }
  };
  std::vector<int64_t> sc_i(static_cast<size_t>(P));
  const scalar_t* qp = static_cast<const scalar_t*>(p.q);
  const scalar_t* kc = static_cast<const scalar_t*>(p.k_cache);
  const scalar_t* vc = static_cast<const scalar_t*>(p.v_cache);
  const float* tab = p.cos_sin;
  const int64_t ts = p.table_stride;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  for (int64_t item = item_begin; item < item_end; ++item) {
    // Items run in the order (sequence, split, KV head): the H_k items that read the same table
    // rows (the same keys' positions) run one after the other (or side by side on the threads),
    // so the rows are re-read from cache, not memory. The partial results keep paged_decode's
    // layout (sequence, KV head, split) for the shared merge.
    const int64_t hk = item % p.heads_k;
    const int64_t s_idx = (item / p.heads_k) % sp.splits;
    const int64_t b = item / (sp.splits * p.heads_k);
    float* part = partial + ((b * p.heads_k + hk) * sp.splits + s_idx) * rep * pf;
    for (int64_t r = 0; r < rep; ++r) {
      part[r * pf] = kNegInf;
      std::fill(part + r * pf + 1, part + (r + 1) * pf, 0.0f);
    }
    const int64_t L = load_index<idx_t>(p.seq_lens, b);
    if (L < 0 || L > p.max_blocks * bs || L > p.max_seqlen_k) {
      bad->fetch_or(kBadBlocks, std::memory_order_relaxed);
      continue;
    }
    const int64_t c = load_index<idx_t>(p.seq_config, b);
    if (c < 0 || c >= p.num_configs) {
      bad->fetch_or(kBadConfig, std::memory_order_relaxed);
      continue;
    }
    const int64_t w = p.window[c];
    bool cfg_ok = w >= 1;
    for (int64_t i = 0; i < P; ++i) {
      sc_i[i] = p.pair_scale[c * P + i];
      cfg_ok = cfg_ok && sc_i[i] >= 1;
    }
    if (!cfg_ok) {
      bad->fetch_or(kBadConfig, std::memory_order_relaxed);
      continue;
    }
    if (L > p.table_rows) {
      bad->fetch_or(kBadTable, std::memory_order_relaxed);
      continue;
    }
    const int64_t n0 = s_idx * sp.split_keys, n1 = std::min(L, n0 + sp.split_keys);
    if (n0 >= n1) continue;
    const int64_t w_lo = L - w;  // keys n >= w_lo are in the window (normal rows)
    const int64_t m = L - 1;
    // Runs of equal scale (the configuration's groups).
    g_start.clear(), g_len.clear(), g_s.clear(), g_q.clear(), g_r.clear();
    for (int64_t i = 0; i < P; ++i) {
      if (i == 0 || sc_i[i] != sc_i[i - 1]) {
        g_start.push_back(i), g_len.push_back(0), g_s.push_back(sc_i[i]), g_q.push_back(0), g_r.push_back(0);
      }
      ++g_len.back();
    }
    const int64_t G = static_cast<int64_t>(g_s.size());
    // The queries, rotated once per item (scale folded in).
    for (int64_t r = 0; r < rep; ++r) {
      const int64_t h = hk * rep + r;
      const scalar_t* a = qp + b * p.q_strides.seq + h * p.q_strides.head;
      const bool* kd = masked ? p.mask + (c * p.heads_q + h) * P : nullptr;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(a[d]);
      float* qn = qbuf.data() + r * D;
      float* qs = qbuf.data() + rep * D + r * KW;
      rotate_row<kBodyGeneric>(qf.data(), tab + m * ts, qn, P, D, neox);
      for (int64_t i = 0; i < P; ++i) {
        const int64_t s = sc_i[i];
        const int64_t row = ((!kd || kd[i]) && m >= w) ? m / s + (w - w / s) : m;
        cs_q[i] = tab[row * ts + i];
        cs_q[P + i] = tab[row * ts + P + i];
      }
      rotate_row<kBodyGeneric>(qf.data(), cs_q.data(), qs, P, D, neox);
      // rounded to the dtype as rotated (see round_row), then `scale` folded in
      round_row<scalar_t>(qn, D), round_row<scalar_t>(qs, D);
      for (int64_t d = 0; d < D; ++d) qn[d] *= p.scale, qs[d] *= p.scale;
      if (masked) {
        // [q_s on key pairs, 0 elsewhere | q_s on the other pairs and dims past 2P]
        float* qu = qs + D;
        for (int64_t d = 0; d < D; ++d) qu[d] = d < 2 * P ? 0.0f : qs[d];
        for (int64_t d = 2 * P; d < D; ++d) qs[d] = 0.0f;
        for (int64_t i = 0; i < P; ++i) {
          if (kd[i]) continue;
          const int64_t lo = pair_lo(i, neox), hi = pair_hi(i, P, neox);
          qu[lo] = qs[lo], qu[hi] = qs[hi];
          qs[lo] = 0.0f, qs[hi] = 0.0f;
        }
      }
    }
    // Running quotients of the first scaled key n0 (one division per run per item).
    if (n0 < w_lo) {
      for (int64_t g = 0; g < G; ++g) {
        g_q[g] = n0 / g_s[g], g_r[g] = n0 % g_s[g];
      }
    }
    const char* bt_row = static_cast<const char*>(p.block_table) +
                         static_cast<size_t>(b * p.block_table_stride) * sizeof(idx_t);
    for (int64_t c0 = n0; c0 < n1;) {
      const int64_t blk = c0 / bs, blk_start = blk * bs;
      const int64_t c1 = std::min(std::min(n1, c0 + kChunk), blk_start + bs), nc = c1 - c0;
      // 0. prefetch the next chunk's K and V rows (as paged_decode_cpu.h).
      if (c1 < n1) {
        const int64_t nblk = c1 / bs, nphys = load_index<idx_t>(bt_row, nblk);
        if (nphys >= 0 && nphys < p.num_blocks) {
          const int64_t e = std::min(std::min(n1, c1 + kChunk), (nblk + 1) * bs);
          for (int64_t t = c1; t < e; ++t) {
            const int64_t slot = t - nblk * bs;
            prefetch_row(kc + nphys * p.k_strides.block + slot * p.k_strides.slot + hk * p.k_strides.head, D);
            prefetch_row(vc + nphys * p.v_strides.block + slot * p.v_strides.slot + hk * p.v_strides.head, Dv);
          }
          // ... and the table rows they read. Measured (float32, no mask, 16K keys, 1 thread):
          // without this the kernel took 14.8 ms against the rotated-cache path's 5.4 ms, 36% of
          // its samples on the first load of the rotation: the runs' rows n // s are copied by
          // one load instruction for every run (rows n, n / 2, n / 4 ... interleaved), a pattern
          // the hardware's stride prefetchers do not follow, so a run of scale 1 missed the
          // cache on every key.
          const int64_t se = std::min(e, w_lo);
          for (int64_t g = 0; g < G && c1 < se; ++g) {
            const int64_t a = g_start[g], len = g_len[g];
            for (int64_t r = c1 / g_s[g]; r <= (se - 1) / g_s[g]; ++r) {
              const float* row = tab + r * ts;
              __builtin_prefetch(row + a, 0, 3), __builtin_prefetch(row + a + len - 1, 0, 3);
              __builtin_prefetch(row + P + a, 0, 3), __builtin_prefetch(row + P + a + len - 1, 0, 3);
            }
          }
          for (int64_t t = std::max(c1, w_lo); t < e; ++t) prefetch_row(tab + t * ts, 2 * P);
        }
      }
      const int64_t phys = load_index<idx_t>(bt_row, blk);
      if (phys < 0 || phys >= p.num_blocks) {  // unreadable: skipped, and the call fails
        bad->fetch_or(kBadBlocks, std::memory_order_relaxed);
        c0 = c1;
        continue;
      }
      const scalar_t* kblk = kc + phys * p.k_strides.block + hk * p.k_strides.head;
      const scalar_t* vblk = vc + phys * p.v_strides.block + hk * p.v_strides.head;
      // 1a. gptj: the cos | sin rows of the chunk's scaled keys, assembled run by run, then the
      // running quotients advanced by one per key. A whole chunk is assembled before any is
      // read: measured, assembling one key's row just before its rotation cost a third of the
      // kernel (its narrow stores were still in flight when the rotation's wide loads read
      // them: a store-forwarding stall per key).
      if (!neox) {
        for (int64_t t = c0; t < std::min(c1, w_lo); ++t) {
          float* dst = cs_chunk.data() + (t - c0) * 2 * P;
          for (int64_t g = 0; g < G; ++g) {
            const float* row = tab + g_q[g] * ts;
            const int64_t a = g_start[g], len = g_len[g];
            for (int64_t i = 0; i < len; ++i) dst[a + i] = row[a + i], dst[P + a + i] = row[P + a + i];
          }
          next_key(G);
        }
      }
      // 1b. scores of the chunk's keys, each key rotated once for the rep query heads
      for (int64_t t = c0; t < c1; ++t) {
        const scalar_t* krow = kblk + (t - blk_start) * p.k_strides.slot;
        float* sc = scores.data() + (t - c0);
        if (t >= w_lo) {
          rotate_row<ISA>(krow, tab + t * ts, krot.data(), P, D, neox);
          round_row<scalar_t>(krot.data(), 2 * P);
          for (int64_t r = 0; r < rep; ++r) sc[r * kChunk] = dot_row<ISA>(qbuf.data() + r * D, krot.data(), D);
        } else {
          if (neox) {
            rotate_runs_neox<ISA>(krow, tab, ts, g_start.data(), g_len.data(), g_q.data(), G, krot.data(), P, D);
            next_key(G);
          } else {
            rotate_row<ISA>(krow, cs_chunk.data() + (t - c0) * 2 * P, krot.data(), P, D, neox);
          }
          round_row<scalar_t>(krot.data(), 2 * P);
          if (masked) {
            rotate_row<ISA>(krow, tab + t * ts, krot.data() + D, P, D, neox);
            round_row<scalar_t>(krot.data() + D, 2 * P);
          }
          const float* qs = qbuf.data() + rep * D;
          for (int64_t r = 0; r < rep; ++r) sc[r * kChunk] = dot_row<ISA>(qs + r * KW, krot.data(), KW);
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
__attribute__((flatten)) void rotary_items_generic(const PagedDecodeRotaryParams& p, const Split& sp, float* partial,
                                                   int64_t a, int64_t e, std::atomic<int>* bad) {
  rotary_items_body<kBodyGeneric, 0, scalar_t, idx_t>(p, sp, partial, a, e, bad);
}

#ifdef DPE_HAVE_AVX2_PATH
template <int DH, typename scalar_t, typename idx_t>
__attribute__((target("avx2,fma,f16c"), flatten)) void rotary_items_avx2(const PagedDecodeRotaryParams& p,
                                                                          const Split& sp, float* partial, int64_t a,
                                                                          int64_t e, std::atomic<int>* bad) {
  rotary_items_body<kBodyAvx2, DH, scalar_t, idx_t>(p, sp, partial, a, e, bad);
}

template <int DH, typename scalar_t, typename idx_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"), flatten))
void rotary_items_avx512(const PagedDecodeRotaryParams& p, const Split& sp, float* partial, int64_t a, int64_t e,
                         std::atomic<int>* bad) {
  rotary_items_body<kBodyAvx512, DH, scalar_t, idx_t>(p, sp, partial, a, e, bad);
}
#endif

template <typename scalar_t, typename idx_t>
void rotary_items_isa(const PagedDecodeRotaryParams& p, const Split& sp, float* partial, int64_t a, int64_t e,
                      std::atomic<int>* bad) {
#ifdef DPE_HAVE_AVX2_PATH
  const int64_t dh = p.head_dim == p.v_head_dim ? p.head_dim : 0;
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
      if (dh == 64) return rotary_items_avx512<64, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      if (dh == 128) return rotary_items_avx512<128, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      return rotary_items_avx512<0, scalar_t, idx_t>(p, sp, partial, a, e, bad);
    case CpuIsa::kAvx2:
      if (dh == 64) return rotary_items_avx2<64, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      if (dh == 128) return rotary_items_avx2<128, scalar_t, idx_t>(p, sp, partial, a, e, bad);
      return rotary_items_avx2<0, scalar_t, idx_t>(p, sp, partial, a, e, bad);
    default: break;
  }
#endif
  rotary_items_generic<scalar_t, idx_t>(p, sp, partial, a, e, bad);
}

template <typename scalar_t>
void rotary_items_idx(const PagedDecodeRotaryParams& p, const Split& sp, float* partial, int64_t a, int64_t e,
                      std::atomic<int>* bad) {
  if (p.index_type == IndexType::kInt32) rotary_items_isa<scalar_t, int32_t>(p, sp, partial, a, e, bad);
  else rotary_items_isa<scalar_t, int64_t>(p, sp, partial, a, e, bad);
}

}  // namespace paged_detail

inline PagedDecodePlan plan_paged_decode_rotary(const PagedDecodeRotaryParams& p, int64_t threads) {
  const paged_detail::Split sp =
      paged_detail::plan_splits_dims(p.batch, p.heads_k, p.max_seqlen_k, p.block_size, std::max<int64_t>(1, threads));
  const int64_t items = p.batch * p.heads_k * sp.splits;
  return PagedDecodePlan{sp, items, items * (p.heads_q / p.heads_k) * paged_detail::partial_floats_dims(p.v_head_dim)};
}

/// Items [begin, end) of a plan (ranges may run concurrently). ORs RotaryBad
/// bits into *bad on an unreadable value.
inline void paged_decode_rotary_range(const PagedDecodeRotaryParams& p, const PagedDecodePlan& plan, float* partial,
                                      int64_t begin, int64_t end, std::atomic<int>* bad) {
  if (begin >= end) return;
  using namespace paged_detail;
  switch (p.dtype) {
    case DType::kFloat32: return rotary_items_idx<CpuScalar<DType::kFloat32>::type>(p, plan.split, partial, begin, end, bad);
    case DType::kFloat16: return rotary_items_idx<CpuScalar<DType::kFloat16>::type>(p, plan.split, partial, begin, end, bad);
    case DType::kBFloat16: return rotary_items_idx<CpuScalar<DType::kBFloat16>::type>(p, plan.split, partial, begin, end, bad);
  }
}

/// Merge the splits of sequences [b_begin, b_end) into out and lse.
inline void paged_decode_rotary_merge(const PagedDecodeRotaryParams& p, const PagedDecodePlan& plan,
                                      const float* partial, int64_t b_begin, int64_t b_end) {
  merge_split_partials(p.heads_q, p.heads_k, p.v_head_dim, plan.split.splits, partial, p.out, p.lse, b_begin, b_end);
}

/// The whole op on the calling thread(s): validate, plan, run every item, merge.
inline Status paged_decode_rotary_cpu(const PagedDecodeRotaryParams& p, int num_threads = 0) {
  Status st = validate_paged_decode_rotary(p);
  if (!st.ok()) return st;
  if (p.batch == 0) return ok_status();
  int64_t threads = 1;
#if defined(_OPENMP)
  threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
#endif
  const PagedDecodePlan plan = plan_paged_decode_rotary(p, threads);
  std::vector<float> partial(static_cast<size_t>(plan.partial_floats));
  std::atomic<int> bad{0};
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads)) if (threads > 1)
#endif
  for (int64_t i = 0; i < plan.items; ++i) paged_decode_rotary_range(p, plan, partial.data(), i, i + 1, &bad);
  if (bad.load()) return error(ErrorCode::kInvalidValue, rotary_bad_message(bad.load()));
  paged_decode_rotary_merge(p, plan, partial.data(), 0, p.batch);
  return ok_status();
}

}  // namespace dpe
