// DPE rotary step on the CPU: header-only, torch-free entry points.
//
//   dpe::Status dpe::rope_cpu(const RopeParams&, int num_threads = 0);
//   dpe::Status dpe::rope_and_cache_cpu(const RopeCacheParams&, int num_threads = 0);
//
// Both validate their arguments (dpe/rope.h), check the host-readable values
// (positions >= 0, pair_scale >= 1, slots < num_blocks * block_size), then
// split the tokens over OpenMP threads when compiled with OpenMP (-fopenmp),
// else run on the calling thread. An engine with its own thread pool calls
// validate_rope / validate_rope_and_cache and check_host_values once, then
// rope_cpu_range on each token range (the torch launcher csrc/rope.cpp does
// this with at::parallel_for).
//
// Performance choices (keep them):
//   * per token, sin/cos of the three angles are computed once per pair into
//     a small scratch table and reused by every head: trigonometry costs
//     O(T * P), not O(T * H * P); a group's scaled angles are recomputed only
//     when its index m // s changes (every s tokens of consecutive positions);
//   * the batched sin/cos (sincos_batch) is branch-free double-precision
//     Cody-Waite + Taylor, vectorised, within 1 ulp of sinf/cosf;
//   * the per-head loop runs over contiguous pairs with no calls and no
//     data-dependent control flow (mask select by bit operations), so the
//     compiler vectorises it; it is compiled four times (baseline, AVX2+FMA,
//     AVX-512 with 512-bit vectors, AVX-512 + AVX512-BF16) and picked at run
//     time by CPU features;
//   * float16 is the compiler's _Float16 where it has one (F16C conversions
//     vectorise), bfloat16 a 16-bit storage with branch-free conversions, or,
//     on AVX512-BF16 CPUs in the rotate_half layout, an intrinsic rotation
//     whose float -> bfloat16 is the CPU's converter (rotate_head_avx512_neox);
//   * with a per-query-head mask and GQA, each KV head is rotated once fully
//     scaled and every scaled key head is a bitwise select between that row
//     and the normal row (no further rotation or rounding);
//   * in place (q_normal is q / k_normal is k) each pair is loaded before
//     either output is stored, through one pointer (no restrict aliasing).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "dpe/rope.h"

namespace dpe {

// ---------------------------------------------------------------------------
// Batched float32 sin/cos, written so the compiler vectorises it (the libm
// calls it replaces cost more than the whole rotation otherwise). The float
// angle is widened to double (exact) and reduced by pi/2 in two steps
// (Cody-Waite): pi/2 = kPio2Hi + kPio2Lo with kPio2Hi holding 25 significant
// bits, so fn * kPio2Hi is exact for |fn| < 2^28 and the reduced argument is
// accurate to ~1e-15, far below float resolution. sin/cos of |r| <= pi/4 come
// from their Taylor series in double (truncation error < 1e-11), rounded once
// to float: results are within 1 ulp of the exact value, the accuracy of
// sinf/cosf. Angles past the reduction range (|x| >= 2^28, i.e. positions
// beyond ~2.7e8 at inv_freq 1) fall back to std::sin/std::cos.
constexpr double kTwoOverPi = 0x1.45f306dc9c883p-1;
constexpr double kPio2Hi = 0x1.921fb5p+0;
constexpr double kPio2Lo = 0x1.110b4611a6263p-26;
constexpr double kRoundMagic = 0x1.8p52;  // adding and subtracting it rounds to an integer
constexpr float kMaxReduced = 0x1p28f;

DPE_ALWAYS_INLINE void sincos_batch(const float* __restrict x, float* __restrict sin_out,
                                    float* __restrict cos_out, int64_t n) {
  // Branch-free body (quadrant select and signs by bit operations) so that it
  // vectorises; the baseline ISA has no double->int64 conversion, so the
  // quadrant is read from the low mantissa bits of the rounding sum instead.
  int64_t num_large = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double xd = static_cast<double>(x[i]);
    const double shifted = xd * kTwoOverPi + kRoundMagic;  // low bits hold round(x * 2/pi)
    const double fn = shifted - kRoundMagic;
    const double r = (xd - fn * kPio2Hi) - fn * kPio2Lo;
    const double z = r * r;
    // sin r = r (1 - z/3! + z^2/5! - ... - z^5/11!), cos r = 1 - z/2! + ... + z^6/12!
    const double sr =
        r * (1.0 + z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 +
                                                         z * (1.0 / 362880 + z * (-1.0 / 39916800))))));
    const double cr =
        1.0 + z * (-0.5 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (1.0 / 40320 +
                                                            z * (-1.0 / 3628800 +
                                                                 z * (1.0 / 479001600))))));
    // Quadrant q = round(x * 2/pi) mod 4:
    //   sin x = (sr, cr, -sr, -cr)[q],  cos x = (cr, -sr, -cr, sr)[q].
    const uint64_t q = double_bits(shifted);
    const uint64_t odd = 0 - (q & 1);  // all ones when q is odd
    const uint64_t s_bits = (double_bits(cr) & odd) | (double_bits(sr) & ~odd);
    const uint64_t c_bits = (double_bits(sr) & odd) | (double_bits(cr) & ~odd);
    const uint64_t sin_flip = (q & 2) << 62;        // q in {2, 3}
    const uint64_t cos_flip = ((q + 1) & 2) << 62;  // q in {1, 2}
    sin_out[i] = static_cast<float>(bits_double(s_bits ^ sin_flip));
    cos_out[i] = static_cast<float>(bits_double(c_bits ^ cos_flip));
    num_large += static_cast<int64_t>(!(std::fabs(x[i]) < kMaxReduced));  // NaN/inf too
  }
  if (num_large) {
    for (int64_t i = 0; i < n; ++i) {
      if (!(std::fabs(x[i]) < kMaxReduced)) {
        sin_out[i] = std::sin(x[i]);
        cos_out[i] = std::cos(x[i]);
      }
    }
  }
}

// Rotate one head vector x (D elements, pairs in layout NEOX) into the normal
// output y_n and the scaled output y_s.
// Scaled pairs use (cs, ss) where the mask row says "key dimension" (or
// everywhere without a mask) and the normal angle elsewhere.
template <typename scalar_t, bool NEOX, bool HAS_MASK>
DPE_ALWAYS_INLINE void rotate_head(const scalar_t* __restrict x, scalar_t* __restrict y_n,
                                   scalar_t* __restrict y_s, const float* __restrict cn,
                                   const float* __restrict sn, const float* __restrict cs,
                                   const float* __restrict ss, const uint32_t* __restrict mask_row,
                                   int64_t num_pairs, int64_t head_dim) {
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t i0 = pair_first(i, num_pairs, NEOX);
    const int64_t i1 = pair_second(i, num_pairs, NEOX);
    const float a = static_cast<float>(x[i0]);
    const float b = static_cast<float>(x[i1]);
    float n0, n1;
    rotate_pair(a, b, cn[i], sn[i], &n0, &n1);
    y_n[i0] = static_cast<scalar_t>(n0);
    y_n[i1] = static_cast<scalar_t>(n1);
    float c = cs[i], s = ss[i];
    if (HAS_MASK) {
      // Select by bit mask, not by branch or ternary: keeps the loop vectorised.
      const uint32_t key_dim = mask_row[i];
      c = bits_float((float_bits(c) & key_dim) | (float_bits(cn[i]) & ~key_dim));
      s = bits_float((float_bits(s) & key_dim) | (float_bits(sn[i]) & ~key_dim));
    }
    float o0, o1;
    rotate_pair(a, b, c, s, &o0, &o1);
    y_s[i0] = static_cast<scalar_t>(o0);
    y_s[i1] = static_cast<scalar_t>(o1);
  }
  // Dimensions past rotary_dim pass through unchanged (partial rotary).
  for (int64_t d = 2 * num_pairs; d < head_dim; ++d) {
    y_n[d] = x[d];
    y_s[d] = x[d];
  }
}

// In-place variant: xy is both the input and the normal output. Each
// iteration loads its pair (a, b) before storing to it, and no iteration
// touches another's elements, so the loop is exact in place; one pointer
// (rather than x and y_n restrict-qualified on one buffer) keeps it defined
// behaviour. Neox pairs are addressed through the two halves lo = xy and
// hi = xy + P, which never overlap inside the loop, so the compiler still
// vectorises it with no alias check.
template <typename scalar_t, bool NEOX, bool HAS_MASK>
DPE_ALWAYS_INLINE void rotate_head_in_place(scalar_t* xy, scalar_t* __restrict y_s,
                                            const float* __restrict cn, const float* __restrict sn,
                                            const float* __restrict cs, const float* __restrict ss,
                                            const uint32_t* __restrict mask_row,
                                            int64_t num_pairs, int64_t head_dim) {
  scalar_t* __restrict lo = xy;
  scalar_t* __restrict hi = NEOX ? xy + num_pairs : xy + 1;
  const int64_t step = NEOX ? 1 : 2;
  for (int64_t i = 0; i < num_pairs; ++i) {
    const float a = static_cast<float>(lo[i * step]);
    const float b = static_cast<float>(hi[i * step]);
    float n0, n1;
    rotate_pair(a, b, cn[i], sn[i], &n0, &n1);
    float c = cs[i], s = ss[i];
    if (HAS_MASK) {
      const uint32_t key_dim = mask_row[i];
      c = bits_float((float_bits(c) & key_dim) | (float_bits(cn[i]) & ~key_dim));
      s = bits_float((float_bits(s) & key_dim) | (float_bits(sn[i]) & ~key_dim));
    }
    float o0, o1;
    rotate_pair(a, b, c, s, &o0, &o1);
    lo[i * step] = static_cast<scalar_t>(n0);
    hi[i * step] = static_cast<scalar_t>(n1);
    y_s[pair_first(i, num_pairs, NEOX)] = static_cast<scalar_t>(o0);
    y_s[pair_second(i, num_pairs, NEOX)] = static_cast<scalar_t>(o1);
  }
  // Pass-through dims: already in place in xy; copy to the scaled output.
  for (int64_t d = 2 * num_pairs; d < head_dim; ++d) y_s[d] = xy[d];
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DPE_HAVE_BF16_PATH 1
// float32 and bfloat16, rotate_half layout, on CPUs with AVX512-BF16: the
// rotation of rotate_head / rotate_head_in_place written with intrinsics.
//   * bfloat16: float -> bfloat16 is the CPU's converter (VCVTNEPS2BF16,
//     round to nearest even, one instruction per 16 values) instead of the
//     portable branch-free rounding, whose operations dominate the 16-bit
//     body. The converter treats float denormals as zero and quiets NaNs
//     keeping their payload (bf16_storage gives 0x7FC0): results differ only
//     there.
//   * streaming: fresh outputs (the scaled rows; the normal rows when not in
//     place) of a large call go straight from registers to memory with
//     non-temporal stores, a full 64-byte line (float32) or half a line
//     (bfloat16) per store, so no line is read for ownership first and no
//     scratch copy is made (see kStreamMinBytes). NT_N / NT_S are only set by
//     the caller when the row is aligned to the store (64 / 32 bytes) and the
//     pairs fill whole 16-lane vectors (num_pairs % 16 == 0).
// x may be y_n (in place: each 16-pair slice is loaded before it is stored).
// One target for both element types (the bf16 converter needs avx512bf16), so
// this body runs on AVX512-BF16 CPUs only; the AVX-512 body without it keeps
// the portable rotation. The entry, rotate_heads_avx512_neox, rotates every
// head of one token: it cannot be inlined into the target-less token loop
// (rope_cpu_tokens_body), and one call per head measured ~20% slower in
// bfloat16 than one per token.
// The target of rope_cpu_tokens_avx512bf16 exactly (GCC inlines only between
// equal targets); the helpers are always_inline into rotate_heads_avx512_neox.
#define DPE_AVX512BF16_ATTR target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,prefer-vector-width=512")
#define DPE_AVX512BF16_TARGET __attribute__((DPE_AVX512BF16_ATTR, always_inline))

struct F32Lanes {  // 16 float32 values
  using elem = float;
  template <bool FULL>
  DPE_AVX512BF16_TARGET static __m512 load(const float* src, __mmask16 m) {
    return FULL ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(m, src);
  }
  template <bool FULL, bool NT>
  DPE_AVX512BF16_TARGET static void store(float* dst, __mmask16 m, __m512 v) {
    if (NT) _mm512_stream_ps(dst, v);  // 64-byte aligned, FULL (caller's guarantee)
    else if (FULL) _mm512_storeu_ps(dst, v);
    else _mm512_mask_storeu_ps(dst, m, v);
  }
};

struct Bf16Lanes {  // 16 bfloat16 values, computed in float32
  using elem = bf16_storage;
  template <bool FULL>
  DPE_AVX512BF16_TARGET static __m512 load(const bf16_storage* src, __mmask16 m) {
    // (maskz forms with a full mask: the unmasked intrinsics start from
    // _mm512_undefined, which GCC 12 reports as maybe-uninitialized)
    const __m256i h = FULL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                           : _mm256_maskz_loadu_epi16(m, src);
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h), 16));
  }
  template <bool FULL, bool NT>
  DPE_AVX512BF16_TARGET static void store(bf16_storage* dst, __mmask16 m, __m512 v) {
    const __m256bh hb = _mm512_cvtneps_pbh(v);
    const __m256i h = reinterpret_cast<const __m256i&>(hb);
    if (NT) _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), h);  // 32-byte aligned, FULL
    else if (FULL) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
    else _mm256_mask_storeu_epi16(dst, m, h);
  }
};

// 16 pairs starting at pair i; FULL: all 16 lanes (unmasked loads, measured
// faster than masked ones on Zen 4), else the first `m` lanes.
template <class Lanes, bool FULL, bool HAS_MASK, bool NT_N, bool NT_S>
DPE_AVX512BF16_TARGET inline void rotate_16_pairs(const typename Lanes::elem* x, typename Lanes::elem* y_n,
                                                  typename Lanes::elem* y_s, const float* cn, const float* sn,
                                                  const float* cs, const float* ss, const uint32_t* mask_row,
                                                  int64_t P, int64_t i, __mmask16 m) {
  const __m512 a = Lanes::template load<FULL>(x + i, m), b = Lanes::template load<FULL>(x + P + i, m);
  const __m512 c = FULL ? _mm512_loadu_ps(cn + i) : _mm512_maskz_loadu_ps(m, cn + i);
  const __m512 s = FULL ? _mm512_loadu_ps(sn + i) : _mm512_maskz_loadu_ps(m, sn + i);
  __m512 cq = FULL ? _mm512_loadu_ps(cs + i) : _mm512_maskz_loadu_ps(m, cs + i);
  __m512 sq = FULL ? _mm512_loadu_ps(ss + i) : _mm512_maskz_loadu_ps(m, ss + i);
  if (HAS_MASK) {
    const __m512i km = FULL ? _mm512_loadu_si512(mask_row + i) : _mm512_maskz_loadu_epi32(m, mask_row + i);
    const __mmask16 key_dim = _mm512_test_epi32_mask(km, km);
    cq = _mm512_mask_blend_ps(key_dim, c, cq);
    sq = _mm512_mask_blend_ps(key_dim, s, sq);
  }
  // rotate_pair: (a c - b s, a s + b c)
  Lanes::template store<FULL, NT_N>(y_n + i, m, _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s)));
  Lanes::template store<FULL, NT_N>(y_n + P + i, m, _mm512_add_ps(_mm512_mul_ps(a, s), _mm512_mul_ps(b, c)));
  Lanes::template store<FULL, NT_S>(y_s + i, m, _mm512_sub_ps(_mm512_mul_ps(a, cq), _mm512_mul_ps(b, sq)));
  Lanes::template store<FULL, NT_S>(y_s + P + i, m, _mm512_add_ps(_mm512_mul_ps(a, sq), _mm512_mul_ps(b, cq)));
}

template <class Lanes, bool HAS_MASK, bool NT_N, bool NT_S>
DPE_AVX512BF16_TARGET inline void rotate_head_avx512_neox(const typename Lanes::elem* x, typename Lanes::elem* y_n,
                                                          typename Lanes::elem* y_s, const float* cn, const float* sn,
                                                          const float* cs, const float* ss, const uint32_t* mask_row,
                                                          int64_t num_pairs, int64_t head_dim) {
  const int64_t P = num_pairs;
  int64_t i = 0;
  for (; i + 16 <= P; i += 16)
    rotate_16_pairs<Lanes, true, HAS_MASK, NT_N, NT_S>(x, y_n, y_s, cn, sn, cs, ss, mask_row, P, i, 0xFFFF);
  // NT_* only with whole vectors: the tail is always ordinary stores.
  if (i < P)
    rotate_16_pairs<Lanes, false, HAS_MASK, false, false>(x, y_n, y_s, cn, sn, cs, ss, mask_row, P, i,
                                                          static_cast<__mmask16>((1u << (P - i)) - 1u));
  // Dimensions past rotary_dim pass through unchanged (bits).
  for (int64_t d = 2 * P; d < head_dim; ++d) {
    y_n[d] = x[d];
    y_s[d] = x[d];
  }
}

// The streaming choice per row: NT stores need the row aligned to the store
// width and whole vectors.
template <class Lanes, bool HAS_MASK>
DPE_AVX512BF16_TARGET inline void rotate_head_avx512_neox_any(const typename Lanes::elem* x,
                                                              typename Lanes::elem* y_n, typename Lanes::elem* y_s,
                                                              bool stream_n, bool stream_s, const float* cn,
                                                              const float* sn, const float* cs, const float* ss,
                                                              const uint32_t* mask_row, int64_t num_pairs,
                                                              int64_t head_dim) {
  constexpr uintptr_t kAlign = sizeof(typename Lanes::elem) * 16 - 1;  // 64 bytes float32, 32 bfloat16
  const bool whole = num_pairs % 16 == 0;
  stream_n = stream_n && whole && (reinterpret_cast<uintptr_t>(y_n) & kAlign) == 0;
  stream_s = stream_s && whole && (reinterpret_cast<uintptr_t>(y_s) & kAlign) == 0;
  if (stream_s) {
    if (stream_n) rotate_head_avx512_neox<Lanes, HAS_MASK, true, true>(x, y_n, y_s, cn, sn, cs, ss, mask_row, num_pairs, head_dim);
    else rotate_head_avx512_neox<Lanes, HAS_MASK, false, true>(x, y_n, y_s, cn, sn, cs, ss, mask_row, num_pairs, head_dim);
  } else {
    rotate_head_avx512_neox<Lanes, HAS_MASK, false, false>(x, y_n, y_s, cn, sn, cs, ss, mask_row, num_pairs, head_dim);
  }
}

// Heads h = 0 .. H-1 of one token: rows x + h * x_head, y_n + h * yn_head,
// y_s + h * ys_head; mask row (h / mask_div) of mask32 (HAS_MASK).
template <class Lanes, bool HAS_MASK>
__attribute__((DPE_AVX512BF16_ATTR)) void rotate_heads_avx512_neox(
    const typename Lanes::elem* x, int64_t x_head, typename Lanes::elem* y_n, int64_t yn_head,
    typename Lanes::elem* y_s, int64_t ys_head, int64_t H, const uint32_t* mask32, int64_t mask_div, bool in_place,
    bool stream_n, bool stream_s, const float* cn, const float* sn, const float* cs, const float* ss, int64_t P,
    int64_t D) {
  for (int64_t h = 0; h < H; ++h) {
    typename Lanes::elem* yn = y_n + h * yn_head;
    const uint32_t* mrow = HAS_MASK ? mask32 + (h / mask_div) * P : nullptr;
    rotate_head_avx512_neox_any<Lanes, HAS_MASK>(in_place ? yn : x + h * x_head, yn, y_s + h * ys_head,
                                                 stream_n && !in_place, stream_s, cn, sn, cs, ss, mrow, P, D);
  }
}
#endif

// One head: in place or not, by a run-time flag (the same for every head).
template <typename scalar_t, bool NEOX, bool HAS_MASK>
DPE_ALWAYS_INLINE void rotate_head_any(const scalar_t* x, scalar_t* y_n, scalar_t* y_s,
                                       bool in_place, const float* cn, const float* sn,
                                       const float* cs, const float* ss, const uint32_t* mask_row,
                                       int64_t num_pairs, int64_t head_dim) {
  if (in_place) {
    rotate_head_in_place<scalar_t, NEOX, HAS_MASK>(y_n, y_s, cn, sn, cs, ss, mask_row, num_pairs,
                                                   head_dim);
  } else {
    rotate_head<scalar_t, NEOX, HAS_MASK>(x, y_n, y_s, cn, sn, cs, ss, mask_row, num_pairs,
                                                head_dim);
  }
}

// Unsigned integer of a storage type's width, for bitwise selects on stored
// values.
template <size_t N>
struct UintOfSize;
template <>
struct UintOfSize<2> {
  using type = uint16_t;
};
template <>
struct UintOfSize<4> {
  using type = uint32_t;
};

// y = bits of a where the element mask is all ones, of b elsewhere. Rounding
// to the storage type is elementwise, so selecting rounded outputs equals
// rounding the selected float results: exact, and far cheaper than rotating.
template <typename scalar_t>
DPE_ALWAYS_INLINE void select_head(const scalar_t* __restrict a, const scalar_t* __restrict b,
                                   const typename UintOfSize<sizeof(scalar_t)>::type* __restrict m,
                                   scalar_t* __restrict y, int64_t head_dim) {
  using U = typename UintOfSize<sizeof(scalar_t)>::type;
  for (int64_t d = 0; d < head_dim; ++d) {
    U ua, ub;
    std::memcpy(&ua, a + d, sizeof(U));
    std::memcpy(&ub, b + d, sizeof(U));
    const U u = static_cast<U>((ua & m[d]) | (ub & static_cast<U>(~m[d])));
    std::memcpy(y + d, &u, sizeof(U));
  }
}

// Scaled outputs of a large call are written with streaming (non-temporal)
// stores. They are fresh rows the kernel never reads back, so an ordinary
// store first reads each line into the cache (read-for-ownership): one extra
// read of every scaled byte, a third of the in-place kernel's traffic. Below
// kStreamMinBytes the outputs likely stay in cache for their consumer (the
// attention that follows), where ordinary stores are cheaper; above it they
// are evicted anyway. Two ways:
//   * the intrinsic AVX512-BF16 bodies (float32 and bfloat16, rotate_half)
//     store aligned rows straight from registers (rotate_head_avx512_neox),
//     and the normal rows too when they are fresh (not in place). Measured on
//     an AVX-512 EPYC (Zen 4, no AMX; T = 16K, 32/8 heads, D = 128, in place,
//     one thread): float32 34-38 -> 28-30 ms, bfloat16 20-21 -> 17-18 ms;
//   * elsewhere float32 only: the row is rotated into an L1 scratch row and
//     copied out with 16-byte streaming stores (SSE2, in every x86-64 build;
//     the write-combining buffers merge them into full lines); other targets,
//     or a row not 16-byte aligned, use memcpy. Measured as above: 46-51 ->
//     44-47 ms (one thread); for the portable bfloat16 body the scratch pass
//     cost more than it saved (27-29 -> 32-33 ms), so bfloat16 is not
//     streamed there.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

namespace detail {
inline int64_t& stream_min_bytes() {
  static int64_t bytes = kStreamMinBytes;
  return bytes;
}
}  // namespace detail

/// float32 scaled outputs of a call at least this large (bytes, q_scaled +
/// k_scaled) are written with streaming stores; kStreamMinBytes unless changed by
/// set_stream_min_bytes (tests: 0 streams every call). Not synchronised:
/// call it while no kernel runs.
inline void set_stream_min_bytes(int64_t bytes) { detail::stream_min_bytes() = bytes < 0 ? 0 : bytes; }
inline int64_t stream_min_bytes() { return detail::stream_min_bytes(); }

DPE_ALWAYS_INLINE void stream_row(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && bytes % 16 == 0) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    for (size_t i = 0; i < bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Orders this thread's streaming stores before whatever follows the kernel.
DPE_ALWAYS_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// sin/cos of the three indices of every pair for the current token, kept per
// thread across the tokens of its chunk. Pairs form runs of equal scale (the
// groups); a run's scaled indices m // s + (w - w // s) and m // s change only
// every s tokens of consecutive positions, so the run's scaled sin/cos are
// recomputed only when its index changes. Normal angles change every token.
class TokenTrig {
 public:
  explicit TokenTrig(const KernelArgs& p) : p_(p), buf_(static_cast<size_t>(7 * p.num_pairs)) {
    const int64_t P = p.num_pairs;
    for (int64_t i = 0; i < P; ++i) {
      if (i == 0 || p.pair_scale[i] != p.pair_scale[i - 1]) runs_.push_back({i, i + 1, p.pair_scale[i], -1, -1});
      else runs_.back().end = i + 1;
    }
  }
  // Layout of buf_: angles | sin_n | sin_qs | sin_ks | cos_n | cos_qs | cos_ks, P floats each.
  const float* sin_n() const { return buf_.data() + 1 * p_.num_pairs; }
  const float* sin_qs() const { return buf_.data() + 2 * p_.num_pairs; }
  const float* sin_ks() const { return buf_.data() + 3 * p_.num_pairs; }
  const float* cos_n() const { return buf_.data() + 4 * p_.num_pairs; }
  const float* cos_qs() const { return buf_.data() + 5 * p_.num_pairs; }
  const float* cos_ks() const { return buf_.data() + 6 * p_.num_pairs; }

  DPE_ALWAYS_INLINE void update(int64_t m) {
    const int64_t P = p_.num_pairs;
    float* angles = buf_.data();
    float* out = buf_.data();
    for (int64_t i = 0; i < P; ++i) angles[i] = rope_angle(m, p_.inv_freq[i]);
    sincos_batch(angles, out + 1 * P, out + 4 * P, P);
    for (Run& r : runs_) {
      refresh(r, scaled_query_index(m, r.scale, p_.window), &r.index_q, out + 2 * P, out + 5 * P);
      refresh(r, scaled_key_index(m, r.scale), &r.index_k, out + 3 * P, out + 6 * P);
    }
  }

 private:
  struct Run {
    int64_t begin, end, scale, index_q, index_k;
  };

  DPE_ALWAYS_INLINE void refresh(const Run& r, int64_t index, int64_t* cached, float* sin_out,
                                 float* cos_out) {
    if (index == *cached) return;
    *cached = index;
    float* angles = buf_.data();
    for (int64_t i = r.begin; i < r.end; ++i) angles[i] = rope_angle(index, p_.inv_freq[i]);
    sincos_batch(angles + r.begin, sin_out + r.begin, cos_out + r.begin, r.end - r.begin);
  }

  const KernelArgs& p_;
  std::vector<float> buf_;
  std::vector<Run> runs_;
};

// All heads of one token through the AVX512-BF16 rotation (HW: float32 or
// bfloat16, rotate_half layout) or, head by head, the portable one.
template <bool HW, typename scalar_t, bool NEOX, bool HAS_MASK>
DPE_ALWAYS_INLINE void rotate_heads_dispatch(const scalar_t* x, int64_t x_head, scalar_t* y_n, int64_t yn_head,
                                             scalar_t* y_s, int64_t ys_head, int64_t H, const uint32_t* mask32,
                                             int64_t mask_div, bool in_place, bool stream_n, bool stream_s,
                                             const float* cn, const float* sn, const float* cs, const float* ss,
                                             int64_t num_pairs, int64_t head_dim) {
#ifdef DPE_HAVE_BF16_PATH
  if constexpr (HW) {
    static_assert(NEOX, "the AVX512-BF16 rotation: rotate_half layout");
    using Lanes = typename std::conditional<std::is_same<scalar_t, float>::value, F32Lanes, Bf16Lanes>::type;
    static_assert(std::is_same<typename Lanes::elem, scalar_t>::value, "the AVX512-BF16 rotation: float32, bfloat16");
    rotate_heads_avx512_neox<Lanes, HAS_MASK>(x, x_head, y_n, yn_head, y_s, ys_head, H, mask32, mask_div, in_place,
                                              stream_n, stream_s, cn, sn, cs, ss, num_pairs, head_dim);
    return;
  }
#endif
  (void)stream_n;
  (void)stream_s;
  for (int64_t h = 0; h < H; ++h) {
    const uint32_t* mrow = HAS_MASK ? mask32 + (h / mask_div) * num_pairs : nullptr;
    rotate_head_any<scalar_t, NEOX, HAS_MASK>(x + h * x_head, y_n + h * yn_head, y_s + h * ys_head, in_place, cn, sn,
                                              cs, ss, mrow, num_pairs, head_dim);
  }
}

template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK, bool HW = false>
DPE_ALWAYS_INLINE void rope_cpu_tokens_body(const KernelArgs& p, int64_t begin, int64_t end) {
  const int64_t P = p.num_pairs, D = p.head_dim;
  TokenTrig trig(p);
  // The mask as 32-bit lane masks (all ones = key dimension), built once per
  // chunk, so the per-pair select in rotate_head is three bit operations.
  std::vector<uint32_t> mask32(HAS_MASK ? static_cast<size_t>(p.mask_heads * P) : 0);
  for (size_t i = 0; i < mask32.size(); ++i) mask32[i] = 0u - static_cast<uint32_t>(p.mask[i] != 0);
  const int64_t rep = p.ks_rep();
  // Per-query-head mask with GQA: the mask per element of a head row (all
  // ones where the pair is a key dimension), and a scratch row (see below).
  using U = typename UintOfSize<sizeof(scalar_t)>::type;
  std::vector<U> elem_mask(HAS_MASK && rep > 1 ? static_cast<size_t>(p.heads_ks * D) : 0, U{0});
  if (!elem_mask.empty()) {
    for (int64_t j = 0; j < p.heads_ks; ++j) {
      for (int64_t i = 0; i < P; ++i) {
        const U m = p.mask[j * P + i] ? static_cast<U>(~U{0}) : U{0};
        elem_mask[j * D + pair_first(i, P, NEOX)] = m;
        elem_mask[j * D + pair_second(i, P, NEOX)] = m;
      }
    }
  }
  std::vector<scalar_t> k_all_scaled(static_cast<size_t>(D));
  const int64_t scaled_bytes =
      p.num_tokens() * (p.heads_q + p.heads_ks) * D * static_cast<int64_t>(sizeof(scalar_t));
  const bool large = scaled_bytes >= detail::stream_min_bytes();
  // Streaming (see kStreamMinBytes): the intrinsic rotation (HW) stores
  // straight from registers; the portable float32 body rotates into an L1
  // scratch row and streams it out (stream_row), as does the float32 select
  // of per-query-head scaled keys in either.
  const bool stream_hw = HW && large;
  const bool stream = !HW && sizeof(scalar_t) == 4 && large;
  const bool stream_select = sizeof(scalar_t) == 4 && large;
  std::vector<scalar_t> scratch(stream || stream_select ? static_cast<size_t>(D) : 0);
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(scalar_t);
  const float *sn = trig.sin_n(), *sqs = trig.sin_qs(), *sks = trig.sin_ks();
  const float *cn = trig.cos_n(), *cqs = trig.cos_qs(), *cks = trig.cos_ks();

  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  const scalar_t* k = static_cast<const scalar_t*>(p.k);
  scalar_t* qn = static_cast<scalar_t*>(p.q_normal);
  scalar_t* kn = static_cast<scalar_t*>(p.k_normal);
  scalar_t* qs = static_cast<scalar_t*>(p.q_scaled);
  scalar_t* ks = static_cast<scalar_t*>(p.k_scaled);

  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / p.seqlen, s = t % p.seqlen;
    trig.update(p.position<pos_t>(b, s));
    if (!stream) {  // every query head of the token in one call
      rotate_heads_dispatch<HW, scalar_t, NEOX, HAS_MASK>(
          q + p.q_rows.at(b, s, 0), p.q_rows.head, qn + p.qn_rows.at(b, s, 0), p.qn_rows.head,
          qs + p.qs_rows.at(b, s, 0), p.qs_rows.head, p.heads_q, mask32.data(),
          HAS_MASK ? p.heads_q / p.mask_heads : 1, p.q_in_place, stream_hw, stream_hw, cn, sn, cqs, sqs, P, D);
    } else {  // portable float32 streaming: each head through the scratch row
      for (int64_t h = 0; h < p.heads_q; ++h) {
        rotate_heads_dispatch<HW, scalar_t, NEOX, HAS_MASK>(
            q + p.q_rows.at(b, s, h), 0, qn + p.qn_rows.at(b, s, h), 0, scratch.data(), 0, 1,
            mask32.data() + (HAS_MASK ? p.q_mask_row(h) * P : 0), 1, p.q_in_place, false, false, cn, sn, cqs, sqs,
            P, D);
        stream_row(qs + p.qs_rows.at(b, s, h), scratch.data(), row_bytes);
      }
    }
    int64_t ko = 0, ki = 0;
    if (!p.key_row(b, s, &ko, &ki)) continue;  // negative slot: no cache write
    if (HAS_MASK && rep > 1) {
      // Each KV head is read from memory once. With a per-query-head mask it
      // feeds `rep` scaled key heads (k_scaled has H_q heads) that differ only
      // in which pairs take the scaled angle: rotate once fully scaled into a
      // scratch row (read right back: never streamed), then each scaled head
      // is a bitwise select between that row and the normal output (no
      // further rotation or rounding).
      for (int64_t hk = 0; hk < p.heads_k; ++hk) {
        scalar_t* yn = kn + p.kn_rows.at(ko, ki, hk);
        rotate_heads_dispatch<HW, scalar_t, NEOX, false>(k + p.k_rows.at(b, s, hk), 0, yn, 0, k_all_scaled.data(),
                                                         0, 1, nullptr, 1, p.k_in_place, stream_hw, false, cn, sn,
                                                         cks, sks, P, D);
        for (int64_t r = 0; r < rep; ++r) {
          scalar_t* yr = ks + p.ks_rows.at(ko, ki, hk * rep + r);
          select_head<scalar_t>(k_all_scaled.data(), yn, elem_mask.data() + (hk * rep + r) * D,
                                stream_select ? scratch.data() : yr, D);
          if (stream_select) stream_row(yr, scratch.data(), row_bytes);
        }
      }
    } else if (!stream) {  // one scaled key head per KV head; mask row hk
      rotate_heads_dispatch<HW, scalar_t, NEOX, HAS_MASK>(
          k + p.k_rows.at(b, s, 0), p.k_rows.head, kn + p.kn_rows.at(ko, ki, 0), p.kn_rows.head,
          ks + p.ks_rows.at(ko, ki, 0), p.ks_rows.head, p.heads_k, mask32.data(), 1, p.k_in_place, stream_hw,
          stream_hw, cn, sn, cks, sks, P, D);
    } else {
      for (int64_t hk = 0; hk < p.heads_k; ++hk) {
        rotate_heads_dispatch<HW, scalar_t, NEOX, HAS_MASK>(
            k + p.k_rows.at(b, s, hk), 0, kn + p.kn_rows.at(ko, ki, hk), 0, scratch.data(), 0, 1,
            mask32.data() + (HAS_MASK ? hk * P : 0), 1, p.k_in_place, false, false, cn, sn, cks, sks, P, D);
        stream_row(ks + p.ks_rows.at(ko, ki, hk), scratch.data(), row_bytes);
      }
    }
    if (p.v_cache != nullptr) {  // rope_and_cache: v goes to its cache unchanged
      const scalar_t* v = static_cast<const scalar_t*>(p.v);
      scalar_t* vc = static_cast<scalar_t*>(p.v_cache);
      for (int64_t hk = 0; hk < p.heads_k; ++hk) {
        std::memcpy(vc + p.vc_rows.at(ko, ki, hk), v + p.v_rows.at(b, s, hk),
                    static_cast<size_t>(p.v_head_dim) * sizeof(scalar_t));
      }
    }
  }
  if (large) stream_fence();
}

// The body compiled three times: for the baseline ISA, for AVX2+FMA (8-wide
// float, 4-wide double) and for AVX-512, picked at run time by the CPU's
// features.
template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK>
void rope_cpu_tokens_generic(const KernelArgs& p, int64_t begin, int64_t end) {
  rope_cpu_tokens_body<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
}

#ifdef DPE_HAVE_AVX2_PATH
template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK>
__attribute__((target("avx2,fma,f16c"))) void rope_cpu_tokens_avx2(const KernelArgs& p,
                                                                   int64_t begin, int64_t end) {
  rope_cpu_tokens_body<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
}

// AVX-512 build (16-wide float): the rotation loop is compute-bound (the
// 16-bit conversions dominate), and 512-bit vectors cut its time by ~1.4x
// on AVX-512 CPUs. prefer-vector-width=512 is needed: GCC otherwise keeps
// 256-bit vectors even when AVX-512 is enabled.
template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")))
void rope_cpu_tokens_avx512(const KernelArgs& p, int64_t begin, int64_t end) {
  rope_cpu_tokens_body<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
}

// AVX-512 with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire
// Rapids and later): float32 and bfloat16 in the rotate_half layout take the
// intrinsic rotation (rotate_head_avx512_neox, streaming stores direct from
// registers); everything else is the AVX-512 body.
template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,prefer-vector-width=512"), flatten))
void rope_cpu_tokens_avx512bf16(const KernelArgs& p, int64_t begin, int64_t end) {
  constexpr bool kIntrinsic =
      NEOX && (std::is_same<scalar_t, bf16_storage>::value || std::is_same<scalar_t, float>::value);
  rope_cpu_tokens_body<scalar_t, pos_t, NEOX, HAS_MASK, kIntrinsic>(p, begin, end);
}
#endif

template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK>
void rope_cpu_tokens_impl(const KernelArgs& p, int64_t begin, int64_t end) {
  switch (active_cpu_isa()) {
#ifdef DPE_HAVE_AVX2_PATH
    case CpuIsa::kAvx512Bf16: return rope_cpu_tokens_avx512bf16<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
    case CpuIsa::kAvx512: return rope_cpu_tokens_avx512<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
    case CpuIsa::kAvx2: return rope_cpu_tokens_avx2<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
#endif
    default: return rope_cpu_tokens_generic<scalar_t, pos_t, NEOX, HAS_MASK>(p, begin, end);
  }
}

template <typename scalar_t, typename pos_t>
void rope_cpu_tokens_layout(const KernelArgs& p, int64_t begin, int64_t end) {
  const bool has_mask = p.mask != nullptr;
  if (p.neox) {
    if (has_mask) rope_cpu_tokens_impl<scalar_t, pos_t, true, true>(p, begin, end);
    else rope_cpu_tokens_impl<scalar_t, pos_t, true, false>(p, begin, end);
  } else {
    if (has_mask) rope_cpu_tokens_impl<scalar_t, pos_t, false, true>(p, begin, end);
    else rope_cpu_tokens_impl<scalar_t, pos_t, false, false>(p, begin, end);
  }
}

template <typename scalar_t>
void rope_cpu_tokens_pos(const KernelArgs& p, int64_t begin, int64_t end) {
  if (p.pos_type == IndexType::kInt32) rope_cpu_tokens_layout<scalar_t, int32_t>(p, begin, end);
  else rope_cpu_tokens_layout<scalar_t, int64_t>(p, begin, end);
}

// ===========================================================================
// Entry points
// ===========================================================================

/// Run tokens [begin, end) of the flattened token axis (B * S for rope, T for
/// rope_and_cache) with arguments prepared by validate_rope /
/// validate_rope_and_cache (and checked by check_host_values). No checks
/// here; ranges of one call may run concurrently on different threads.
inline void rope_cpu_range(const KernelArgs& p, int64_t begin, int64_t end) {
  if (begin >= end) return;
  switch (p.dtype) {
    case DType::kFloat32: return rope_cpu_tokens_pos<CpuScalar<DType::kFloat32>::type>(p, begin, end);
    case DType::kFloat16: return rope_cpu_tokens_pos<CpuScalar<DType::kFloat16>::type>(p, begin, end);
    case DType::kBFloat16: return rope_cpu_tokens_pos<CpuScalar<DType::kBFloat16>::type>(p, begin, end);
  }
}

/// The checks that read tensor values (host memory only, O(T + P)):
/// positions >= 0, pair_scale >= 1 (0 would divide by zero), and for
/// rope_and_cache every slot < num_blocks * block_size (negative = skip).
inline Status check_host_values(const KernelArgs& p) {
  for (int64_t i = 0; i < p.num_pairs; ++i)
    if (p.pair_scale[i] < 1) return error(ErrorCode::kInvalidValue, "pair_scale: every scale must be >= 1");
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t s = 0; s < p.seqlen; ++s) {
      const int64_t m = p.pos_type == IndexType::kInt32 ? p.position<int32_t>(b, s)
                                                         : p.position<int64_t>(b, s);
      if (m < 0) return error(ErrorCode::kInvalidValue, "positions: must be >= 0");
    }
  }
  if (p.slot_mapping != nullptr) {
    for (int64_t s = 0; s < p.seqlen; ++s)
      if (p.slot_mapping[s * p.slot_stride] >= p.num_slots)
        return error(ErrorCode::kInvalidValue,
                     "slot_mapping: a slot is >= num_blocks * block_size (outside the cache)");
  }
  return ok_status();
}

/// Run f(begin, end) over [0, n): split into one contiguous chunk per OpenMP
/// thread (at most num_threads; 0 = OpenMP's default; chunks of >= 16
/// tokens) when compiled with OpenMP and not already inside a parallel
/// region, else one call on this thread.
template <class F>
inline void parallel_tokens(int64_t n, int num_threads, F&& f) {
#if defined(_OPENMP)
  constexpr int64_t kGrain = 16;  // a chunk's scratch tables cost ~ one token's work
  int64_t threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  threads = std::min(threads, (n + kGrain - 1) / kGrain);
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t b = std::min(n, id * chunk), e = std::min(n, b + chunk);
      if (b < e) f(b, e);
    }
    return;
  }
#else
  (void)num_threads;
#endif
  f(int64_t{0}, n);
}

/// Op `rope` on the CPU: rotate q and k of every token into q_normal,
/// k_normal, q_scaled and k_scaled (see RopeParams). Host pointers.
/// @param p            the arguments (validated here)
/// @param num_threads  OpenMP threads to use (0: OpenMP's default; 1: this
///                     thread only; ignored without OpenMP)
/// @return             Status{kOk} or the first invalid argument; nothing is
///                     written unless every check passed.
inline Status rope_cpu(const RopeParams& p, int num_threads = 0) {
  KernelArgs a;
  Status st = validate_rope(p, &a);
  if (!st.ok()) return st;
  if (a.num_tokens() == 0) return ok_status();
  st = check_host_values(a);
  if (!st.ok()) return st;
  parallel_tokens(a.num_tokens(), num_threads, [&](int64_t b, int64_t e) { rope_cpu_range(a, b, e); });
  return ok_status();
}

/// Op `rope_and_cache` on the CPU: rotate q and k of T tokens, write
/// q_normal / q_scaled, and k_normal / k_scaled / v into the paged caches at
/// slot_mapping[t] (negative: skipped). Host pointers.
/// @param p            the arguments (validated here, slots included)
/// @param num_threads  as for rope_cpu
/// @return             Status{kOk} or the first invalid argument; nothing is
///                     written unless every check passed.
inline Status rope_and_cache_cpu(const RopeCacheParams& p, int num_threads = 0) {
  KernelArgs a;
  Status st = validate_rope_and_cache(p, &a);
  if (!st.ok()) return st;
  if (a.num_tokens() == 0) return ok_status();
  st = check_host_values(a);
  if (!st.ok()) return st;
  parallel_tokens(a.num_tokens(), num_threads, [&](int64_t b, int64_t e) { rope_cpu_range(a, b, e); });
  return ok_status();
}

}  // namespace dpe
