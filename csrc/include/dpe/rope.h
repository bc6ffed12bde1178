// Dimension-wise RoPE (DPE): the torch-free, header-only C++ API.
//
// This header (and dpe/rope_cpu.h, dpe/rope_cuda.cuh) includes no torch
// header: an inference engine can call the kernels on raw pointers. The shared
// types (dtype/index/layout enums, the error Status, stride blocks) are in
// dpe/common.h. This header holds
//   * the argument blocks RopeParams (op `rope`) and RopeCacheParams (op
//     `rope_and_cache`: rotate and write into a paged KV cache);
//   * their validation (validate_rope, validate_rope_and_cache), shared by
//     the CPU and CUDA entry points, which never read tensor values;
//   * the host/device math that defines the op (index remap, angle, pair
//     rotation), called by both backends, so the CPU tests exercise the same
//     arithmetic the GPU runs.
// Entry points: dpe::rope_cpu / dpe::rope_and_cache_cpu (dpe/rope_cpu.h),
// dpe::rope_cuda / dpe::rope_and_cache_cuda (dpe/rope_cuda.cuh).
//
// Definition (docs/method.md, "Position remapping"). For a token at absolute position m
// and pair i of group g with integer scale s = pair_scale[i], window w:
//   normal                      query m                          key m
//   scaled, key dimension       query m // s + (w - w // s)      key m // s
//   scaled, not key dimension   query m                          key m
// Angle phi = float32(index) * inv_freq[i] in float32 (as Hugging Face
// computes it); sin/cos are full-range accurate (no fast-math intrinsics:
// never build with -ffast-math / --use_fast_math).
//
// Conventions of every argument block:
//   * sizes and strides are in elements (not bytes) and 64-bit; all index
//     arithmetic is 64-bit, so tensors may exceed 2^31 elements;
//   * the last (head_dim) dimension of every tensor has stride 1 and is not
//     passed; any other stride is free (>= 0), so q/k/v may be views of a
//     packed qkv tensor and outputs may be views into larger buffers;
//   * outputs must not overlap the inputs or each other, except the in-place
//     mode: q_normal may alias q and k_normal may alias k (same pointer AND
//     same strides); each pair is read before it is written. Exact pointer
//     equality is checked; partial overlaps cannot be and are the caller's
//     responsibility;
//   * the mask is uint8 [H_m, P] row-major (row stride P), nonzero marks a key
//     dimension; H_m is H_q (per query head) or H_k (per KV head); nullptr
//     means every pair is a key dimension. The scaled keys have H_ks = H_m
//     heads with a mask, else H_k;
//   * pair_scale is int64 [P]: the integer scale s_g >= 1 of the group of
//     each pair (consecutive pairs of equal scale form a group);
//   * positions are >= 0 (then C++ truncating division equals floor).
#pragma once

#include <cmath>
#include <cstdint>

#include "dpe/common.h"

namespace dpe {

/// Arguments of op `rope`: rotate q [B, S, H_q, D] and k [B, S, H_k, D] at the
/// normal and the DPE-scaled positions into four outputs. Every pointer is
/// host memory for rope_cpu and device memory for rope_cuda.
struct RopeParams {
  const void* q = nullptr;           ///< [B, S, H_q, D] dtype, strides q_strides
  RowStrides q_strides;
  const void* k = nullptr;           ///< [B, S, H_k, D] dtype, strides k_strides
  RowStrides k_strides;
  const void* positions = nullptr;   ///< [B, S] pos_type, >= 0
  int64_t pos_stride_batch = 0;      ///< 0 broadcasts one row of positions over the batch
  int64_t pos_stride_token = 1;
  const float* inv_freq = nullptr;   ///< [P] float32, contiguous; pair 0 is the highest frequency
  const int64_t* pair_scale = nullptr;  ///< [P] int64, contiguous, every value >= 1
  const uint8_t* mask = nullptr;     ///< [H_m, P] uint8 row-major, or nullptr (all pairs scaled)
  int64_t mask_heads = 0;            ///< H_m in {H_q, H_k}; ignored when mask is nullptr

  void* q_normal = nullptr;          ///< [B, S, H_q, D] out; may alias q (same strides)
  RowStrides q_normal_strides;
  void* k_normal = nullptr;          ///< [B, S, H_k, D] out; may alias k (same strides)
  RowStrides k_normal_strides;
  void* q_scaled = nullptr;          ///< [B, S, H_q, D] out
  RowStrides q_scaled_strides;
  void* k_scaled = nullptr;          ///< [B, S, H_ks, D] out; H_ks = mask_heads with a mask, else H_k
  RowStrides k_scaled_strides;

  int64_t batch = 0;       ///< B >= 0
  int64_t seqlen = 0;      ///< S >= 0
  int64_t heads_q = 0;     ///< H_q >= 1, a multiple of H_k
  int64_t heads_k = 0;     ///< H_k >= 1
  int64_t head_dim = 0;    ///< D >= 2
  int64_t rotary_dim = 0;  ///< R, even, 2 <= R <= D; dims [R, D) pass through unrotated
  int64_t window = 1;      ///< w >= 1: distances below it keep original positions
  DType dtype = DType::kFloat32;
  IndexType pos_type = IndexType::kInt64;
  Layout layout = Layout::kNeox;
};

/// Arguments of op `rope_and_cache`: rotate q [T, H_q, D] and k [T, H_k, D]
/// of T packed tokens, write q_normal and q_scaled to the caller's outputs,
/// and write k_normal, k_scaled and v into paged caches at
/// slot = slot_mapping[t] (block slot / block_size, offset slot % block_size).
/// A negative slot skips the token's cache writes (vLLM pads with -1); its q
/// outputs are still written. Slots must be < num_blocks * block_size
/// (rope_and_cache_cpu checks; the CUDA kernel never writes past the cache
/// but cannot report it). Every pointer is host memory for the CPU entry
/// point, device memory for the CUDA one.
struct RopeCacheParams {
  const void* q = nullptr;           ///< [T, H_q, D] dtype
  TokenStrides q_strides;
  const void* k = nullptr;           ///< [T, H_k, D] dtype
  TokenStrides k_strides;
  const void* v = nullptr;           ///< [T, H_k, D_v] dtype
  TokenStrides v_strides;
  const void* positions = nullptr;   ///< [T] pos_type, >= 0
  int64_t pos_stride = 1;
  const int64_t* slot_mapping = nullptr;  ///< [T] int64; < 0 skips the token's cache writes
  int64_t slot_stride = 1;
  const float* inv_freq = nullptr;   ///< [P] float32, contiguous
  const int64_t* pair_scale = nullptr;  ///< [P] int64, contiguous, every value >= 1
  const uint8_t* mask = nullptr;     ///< [H_m, P] uint8 row-major, or nullptr
  int64_t mask_heads = 0;            ///< H_m in {H_q, H_k}; ignored when mask is nullptr

  void* q_normal = nullptr;          ///< [T, H_q, D] out; may alias q (same strides)
  TokenStrides q_normal_strides;
  void* q_scaled = nullptr;          ///< [T, H_q, D] out
  TokenStrides q_scaled_strides;
  void* k_cache = nullptr;           ///< [num_blocks, block_size, H_k, D]: k_normal
  CacheStrides k_cache_strides;
  void* ks_cache = nullptr;          ///< [num_blocks, block_size, H_ks, D]: k_scaled
  CacheStrides ks_cache_strides;
  void* v_cache = nullptr;           ///< [num_blocks, block_size, H_k, D_v]: v copied
  CacheStrides v_cache_strides;

  int64_t num_tokens = 0;  ///< T >= 0
  int64_t heads_q = 0;     ///< H_q >= 1, a multiple of H_k
  int64_t heads_k = 0;     ///< H_k >= 1
  int64_t head_dim = 0;    ///< D >= 2 (q, k)
  int64_t v_head_dim = 0;  ///< D_v >= 1
  int64_t rotary_dim = 0;  ///< R, even, 2 <= R <= D
  int64_t window = 1;      ///< w >= 1
  int64_t num_blocks = 0;  ///< cache blocks >= 0
  int64_t block_size = 0;  ///< slots per block >= 1
  DType dtype = DType::kFloat32;
  IndexType pos_type = IndexType::kInt64;
  Layout layout = Layout::kNeox;
};

// ===========================================================================
// Math shared by the backends
// ===========================================================================

// Index remap. All index arithmetic is 64-bit. m >= 0, scale >= 1, window >= 1,
// so C++ truncating division equals floor.
DPE_HOST_DEVICE int64_t scaled_query_index(int64_t m, int64_t scale, int64_t window) {
  return m / scale + (window - window / scale);
}

DPE_HOST_DEVICE int64_t scaled_key_index(int64_t m, int64_t scale) { return m / scale; }

// phi = float32(index) * inv_freq, rounded to float32 once, like HF's
// `inv_freq.float() @ position_ids.float()`.
DPE_HOST_DEVICE float rope_angle(int64_t index, float inv_freq) {
  return static_cast<float>(index) * inv_freq;
}

// Full-range sin/cos of a float32 angle. On the device this is sincosf (with
// Payne-Hanek reduction for large arguments), never __sincosf: angles reach
// 2^24 rad and more for long contexts. The build never passes fast-math.
DPE_HOST_DEVICE void accurate_sincos(float x, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(x, s, c);
#else
  *s = std::sin(x);
  *c = std::cos(x);
#endif
}

// Rotate the pair (a, b) by the angle whose cos/sin are (c, s).
DPE_HOST_DEVICE void rotate_pair(float a, float b, float c, float s, float* out_a, float* out_b) {
  *out_a = a * c - b * s;
  *out_b = a * s + b * c;
}

// Element offsets of pair i inside one head vector.
//   neox (rotate_half, Llama/HF): (i, i + P)
//   gptj (interleaved):           (2i, 2i + 1)
DPE_HOST_DEVICE int64_t pair_first(int64_t i, int64_t /*num_pairs*/, bool neox) {
  return neox ? i : 2 * i;
}
DPE_HOST_DEVICE int64_t pair_second(int64_t i, int64_t num_pairs, bool neox) {
  return neox ? i + num_pairs : 2 * i + 1;
}

// The three angles one (token, pair) needs, as cos/sin: normal (m), scaled
// query index, scaled key index. Computed once and reused across all heads.
struct PairTrig {
  float cos_n, sin_n;    // normal, index m
  float cos_qs, sin_qs;  // scaled query, index m // s + (w - w // s)
  float cos_ks, sin_ks;  // scaled key, index m // s
};

DPE_HOST_DEVICE PairTrig pair_trig(int64_t m, float inv_freq, int64_t scale, int64_t window) {
  PairTrig t;
  accurate_sincos(rope_angle(m, inv_freq), &t.sin_n, &t.cos_n);
  if (scale == 1) {  // m // 1 + (w - w) == m: all three indices coincide
    t.cos_qs = t.cos_ks = t.cos_n;
    t.sin_qs = t.sin_ks = t.sin_n;
  } else {
    accurate_sincos(rope_angle(scaled_query_index(m, scale, window), inv_freq), &t.sin_qs,
                    &t.cos_qs);
    accurate_sincos(rope_angle(scaled_key_index(m, scale), inv_freq), &t.sin_ks, &t.cos_ks);
  }
  return t;
}

// ===========================================================================
// The kernels' common argument block
// ===========================================================================
namespace detail {

// Strides of a tensor addressed by (outer, inner, head): (batch, token, head)
// for the rope op's tensors, (block, slot, head) for a paged cache.
struct Rows {
  int64_t outer = 0, inner = 0, head = 0;
  DPE_HOST_DEVICE int64_t at(int64_t o, int64_t i, int64_t h) const {
    return o * outer + i * inner + h * head;
  }
};

}  // namespace detail

/// The kernels' argument block: both ops in one, so the CPU and CUDA kernels
/// have one body each. Filled by validate_rope / validate_rope_and_cache (do
/// not fill it by hand); pass it to rope_cpu_range to run a token range on
/// your own thread pool.
// Token t of the flattened (batch * seqlen) axis is (b, s) = (t / S, t % S).
// q, k, q_normal, q_scaled (and v) are addressed at (b, s); the key outputs
// at (b, s) too, or, when slot_mapping is set, at (slot / block_size,
// slot % block_size) of the caches, where v is copied as well.
struct KernelArgs {
  const void* q;
  const void* k;
  const void* positions;
  const float* inv_freq;
  const int64_t* pair_scale;
  const uint8_t* mask;
  void* q_normal;
  void* q_scaled;
  void* k_normal;  // or the k cache
  void* k_scaled;  // or the k_scaled cache
  detail::Rows q_rows, k_rows, qn_rows, qs_rows, kn_rows, ks_rows;
  int64_t pos_stride_b, pos_stride_s;

  // rope_and_cache only (slot_mapping == nullptr for rope)
  const int64_t* slot_mapping;
  int64_t slot_stride, block_size, num_slots, v_head_dim;
  const void* v;
  void* v_cache;
  detail::Rows v_rows, vc_rows;

  int64_t batch, seqlen, heads_q, heads_k, heads_ks, head_dim, num_pairs, window;
  int64_t mask_heads;  // H_m, or 0 without a mask
  bool neox;
  bool q_in_place;  // q_normal is q (same strides)
  bool k_in_place;  // k_normal is k (same strides); never with a cache
  DType dtype;
  IndexType pos_type;

  DPE_HOST_DEVICE int64_t num_tokens() const { return batch * seqlen; }
  // Mask row used by query head h (per-query-head or per-KV-head mask).
  DPE_HOST_DEVICE int64_t q_mask_row(int64_t h) const { return h / (heads_q / mask_heads); }
  // Scaled key heads fed by one KV head (1, or n_rep with a per-query-head mask).
  DPE_HOST_DEVICE int64_t ks_rep() const { return heads_ks / heads_k; }
  // Position of flattened token (b, s).
  template <typename pos_t>
  DPE_HOST_DEVICE int64_t position(int64_t b, int64_t s) const {
    const pos_t* pos = static_cast<const pos_t*>(positions);
    return static_cast<int64_t>(pos[b * pos_stride_b + s * pos_stride_s]);
  }
  // Where the key outputs of token (b, s) go: false to skip them (a
  // negative or out-of-range slot). *o, *i: (outer, inner) of kn/ks_rows.
  DPE_HOST_DEVICE bool key_row(int64_t b, int64_t s, int64_t* o, int64_t* i) const {
    if (slot_mapping == nullptr) {
      *o = b;
      *i = s;
      return true;
    }
    const int64_t slot = slot_mapping[s * slot_stride];
    if (slot < 0 || slot >= num_slots) return false;
    *o = slot / block_size;
    *i = slot % block_size;
    return true;
  }
};

namespace detail {

DPE_HOST_DEVICE Rows rows(const RowStrides& s) { return Rows{s.batch, s.token, s.head}; }
DPE_HOST_DEVICE Rows rows(const TokenStrides& s) { return Rows{0, s.token, s.head}; }
DPE_HOST_DEVICE Rows rows(const CacheStrides& s) { return Rows{s.block, s.slot, s.head}; }

inline bool same_rows(const Rows& a, const Rows& b) {
  return a.outer == b.outer && a.inner == b.inner && a.head == b.head;
}
inline bool nonneg(const Rows& r) { return r.outer >= 0 && r.inner >= 0 && r.head >= 0; }

// The fields both argument blocks share (same names in RopeParams and RopeCacheParams).
template <class Params>
inline KernelArgs shared_args(const Params& p) {
  KernelArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.positions = p.positions;
  a.inv_freq = p.inv_freq;
  a.pair_scale = p.pair_scale;
  a.mask = p.mask;
  a.q_normal = p.q_normal;
  a.q_scaled = p.q_scaled;
  a.q_rows = detail::rows(p.q_strides);
  a.k_rows = detail::rows(p.k_strides);
  a.qn_rows = detail::rows(p.q_normal_strides);
  a.qs_rows = detail::rows(p.q_scaled_strides);
  a.heads_q = p.heads_q;
  a.heads_k = p.heads_k;
  a.mask_heads = p.mask != nullptr ? p.mask_heads : 0;
  a.heads_ks = a.mask_heads > 0 ? a.mask_heads : p.heads_k;
  a.head_dim = p.head_dim;
  a.num_pairs = p.rotary_dim / 2;
  a.window = p.window;
  a.neox = p.layout == Layout::kNeox;
  a.dtype = p.dtype;
  a.pos_type = p.pos_type;
  a.q_in_place = p.q_normal == p.q;
  return a;
}

// Checks common to both ops; a.heads_ks etc. already filled.
inline Status validate_common(const KernelArgs& a, int64_t rotary_dim, int32_t dtype,
                              int32_t pos_type, int32_t layout) {
  if (dtype < 0 || dtype > 2) return error(ErrorCode::kInvalidEnum, "dtype: not a dpe::DType");
  if (pos_type < 0 || pos_type > 1)
    return error(ErrorCode::kInvalidEnum, "pos_type: not a dpe::IndexType");
  if (layout < 0 || layout > 1) return error(ErrorCode::kInvalidEnum, "layout: not a dpe::Layout");
  if (a.heads_k < 1 || a.heads_q < 1 || a.heads_q % a.heads_k != 0)
    return error(ErrorCode::kInvalidHeads, "heads_q, heads_k: H_q must be a positive multiple of H_k");
  if (a.head_dim < 2) return error(ErrorCode::kInvalidShape, "head_dim: must be >= 2");
  if (rotary_dim < 2 || rotary_dim % 2 != 0 || rotary_dim > a.head_dim)
    return error(ErrorCode::kInvalidRotaryDim, "rotary_dim: must be even and in [2, head_dim]");
  if (a.window < 1) return error(ErrorCode::kInvalidWindow, "window: must be >= 1");
  if (a.mask != nullptr && a.mask_heads != a.heads_q && a.mask_heads != a.heads_k)
    return error(ErrorCode::kInvalidMask, "mask_heads: must be heads_q or heads_k");
  if (!nonneg(a.q_rows) || !nonneg(a.k_rows))
    return error(ErrorCode::kInvalidStride, "q_strides, k_strides: must be >= 0");
  if (!nonneg(a.qn_rows) || !nonneg(a.qs_rows) || !nonneg(a.kn_rows) || !nonneg(a.ks_rows))
    return error(ErrorCode::kInvalidStride, "output strides: must be >= 0");
  if (a.pos_stride_b < 0 || a.pos_stride_s < 0)
    return error(ErrorCode::kInvalidStride, "positions strides: must be >= 0");
  if (a.num_tokens() == 0) return ok_status();
  if (a.q == nullptr) return error(ErrorCode::kNullPointer, "q: null");
  if (a.k == nullptr) return error(ErrorCode::kNullPointer, "k: null");
  if (a.positions == nullptr) return error(ErrorCode::kNullPointer, "positions: null");
  if (a.inv_freq == nullptr) return error(ErrorCode::kNullPointer, "inv_freq: null");
  if (a.pair_scale == nullptr) return error(ErrorCode::kNullPointer, "pair_scale: null");
  if (a.q_normal == nullptr) return error(ErrorCode::kNullPointer, "q_normal: null");
  if (a.q_scaled == nullptr) return error(ErrorCode::kNullPointer, "q_scaled: null");
  // In place: q_normal may be q, with the same strides; nothing else aliases.
  if (a.q_normal == a.q && !same_rows(a.qn_rows, a.q_rows))
    return error(ErrorCode::kInvalidAlias,
                 "q_normal: aliases q with other strides (in place needs the strides of q)");
  const void* ins[] = {a.q, a.k, a.positions};
  for (const void* in : ins) {
    if (a.q_scaled == in)
      return error(ErrorCode::kInvalidAlias, "q_scaled: aliases an input");
    if (a.k_scaled == in) return error(ErrorCode::kInvalidAlias, "k_scaled: aliases an input");
  }
  if (a.q_normal == a.k || a.q_normal == a.positions)
    return error(ErrorCode::kInvalidAlias, "q_normal: aliases an input other than q");
  return ok_status();
}

}  // namespace detail

// ===========================================================================
// Validation (no tensor value is read: safe for device pointers)
// ===========================================================================

/// Fill the kernels' argument block from RopeParams and check every argument
/// that can be checked without reading tensor values. Entry points call it;
/// callers with their own thread pool call it once, then rope_cpu_range.
inline Status validate_rope(const RopeParams& p, KernelArgs* out) {
  KernelArgs a = detail::shared_args(p);
  a.k_normal = p.k_normal;
  a.k_scaled = p.k_scaled;
  a.kn_rows = detail::rows(p.k_normal_strides);
  a.ks_rows = detail::rows(p.k_scaled_strides);
  a.pos_stride_b = p.pos_stride_batch;
  a.pos_stride_s = p.pos_stride_token;
  a.slot_mapping = nullptr;
  a.batch = p.batch;
  a.seqlen = p.seqlen;
  a.k_in_place = p.k_normal == p.k;
  if (p.batch < 0 || p.seqlen < 0)
    return error(ErrorCode::kInvalidShape, "batch, seqlen: must be >= 0");
  Status st = detail::validate_common(a, p.rotary_dim, static_cast<int32_t>(p.dtype),
                                      static_cast<int32_t>(p.pos_type),
                                      static_cast<int32_t>(p.layout));
  if (!st.ok()) return st;
  if (a.num_tokens() > 0) {
    if (p.k_normal == nullptr) return error(ErrorCode::kNullPointer, "k_normal: null");
    if (p.k_scaled == nullptr) return error(ErrorCode::kNullPointer, "k_scaled: null");
    if (a.k_in_place && !detail::same_rows(a.kn_rows, a.k_rows))
      return error(ErrorCode::kInvalidAlias,
                   "k_normal: aliases k with other strides (in place needs the strides of k)");
    if (p.k_normal == p.q || p.k_normal == p.positions)
      return error(ErrorCode::kInvalidAlias, "k_normal: aliases an input other than k");
    const void* outs[] = {p.q_normal, p.k_normal, p.q_scaled, p.k_scaled};
    for (int i = 0; i < 4; ++i)
      for (int j = i + 1; j < 4; ++j)
        if (outs[i] == outs[j]) return error(ErrorCode::kInvalidAlias, "outputs: two outputs alias");
  }
  if (out != nullptr) *out = a;
  return ok_status();
}

inline Status validate_rope(const RopeParams& p) { return validate_rope(p, nullptr); }

/// As validate_rope, for RopeCacheParams.
inline Status validate_rope_and_cache(const RopeCacheParams& p, KernelArgs* out) {
  KernelArgs a = detail::shared_args(p);
  a.k_normal = p.k_cache;
  a.k_scaled = p.ks_cache;
  a.kn_rows = detail::rows(p.k_cache_strides);
  a.ks_rows = detail::rows(p.ks_cache_strides);
  a.pos_stride_b = 0;
  a.pos_stride_s = p.pos_stride;
  a.slot_mapping = p.slot_mapping;
  a.slot_stride = p.slot_stride;
  a.block_size = p.block_size;
  a.num_slots = p.num_blocks * p.block_size;
  a.v_head_dim = p.v_head_dim;
  a.v = p.v;
  a.v_cache = p.v_cache;
  a.v_rows = detail::rows(p.v_strides);
  a.vc_rows = detail::rows(p.v_cache_strides);
  a.batch = 1;
  a.seqlen = p.num_tokens;
  a.k_in_place = false;
  if (p.num_tokens < 0) return error(ErrorCode::kInvalidShape, "num_tokens: must be >= 0");
  if (p.block_size < 1) return error(ErrorCode::kInvalidShape, "block_size: must be >= 1");
  if (p.num_blocks < 0) return error(ErrorCode::kInvalidShape, "num_blocks: must be >= 0");
  if (p.num_blocks > INT64_MAX / p.block_size)
    return error(ErrorCode::kInvalidShape, "num_blocks * block_size: overflows int64");
  if (p.v_head_dim < 1) return error(ErrorCode::kInvalidShape, "v_head_dim: must be >= 1");
  Status st = detail::validate_common(a, p.rotary_dim, static_cast<int32_t>(p.dtype),
                                      static_cast<int32_t>(p.pos_type),
                                      static_cast<int32_t>(p.layout));
  if (!st.ok()) return st;
  if (!detail::nonneg(a.v_rows) || !detail::nonneg(a.vc_rows) || p.slot_stride < 0)
    return error(ErrorCode::kInvalidStride, "v, v_cache, slot_mapping strides: must be >= 0");
  if (p.num_tokens > 0) {
    if (p.v == nullptr) return error(ErrorCode::kNullPointer, "v: null");
    if (p.slot_mapping == nullptr) return error(ErrorCode::kNullPointer, "slot_mapping: null");
    if (p.k_cache == nullptr) return error(ErrorCode::kNullPointer, "k_cache: null");
    if (p.ks_cache == nullptr) return error(ErrorCode::kNullPointer, "ks_cache: null");
    if (p.v_cache == nullptr) return error(ErrorCode::kNullPointer, "v_cache: null");
    const void* ins[] = {p.q, p.k, p.v, p.positions, p.slot_mapping};
    const void* outs[] = {p.q_normal, p.q_scaled, p.k_cache, p.ks_cache, p.v_cache};
    const char* names[] = {"q_normal: aliases an input other than q", "q_scaled: aliases an input",
                           "k_cache: aliases an input", "ks_cache: aliases an input",
                           "v_cache: aliases an input"};
    for (int o = 0; o < 5; ++o)
      for (int i = 0; i < 5; ++i)
        if (outs[o] == ins[i] && !(o == 0 && i == 0))
          return error(ErrorCode::kInvalidAlias, names[o]);
    for (int i = 0; i < 5; ++i)
      for (int j = i + 1; j < 5; ++j)
        if (outs[i] == outs[j]) return error(ErrorCode::kInvalidAlias, "outputs: two outputs alias");
  }
  if (out != nullptr) *out = a;
  return ok_status();
}

inline Status validate_rope_and_cache(const RopeCacheParams& p) {
  return validate_rope_and_cache(p, nullptr);
}

}  // namespace dpe
