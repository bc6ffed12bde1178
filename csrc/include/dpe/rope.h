// Dimension-wise RoPE (DPE): the math shared by every compiled backend.
//
// This header includes no torch header. It holds the host/device functions
// that define the op (index remap, angle, pair rotation) and the parameter
// block the launchers fill from tensors. The CPU backend (csrc/rope.cpp) and
// the CUDA kernel (csrc/include/dpe/rope_cuda.cuh) both call these functions,
// so the CPU tests exercise the same arithmetic the GPU runs.
//
// Definition: ../../shared/SPEC.md, "Position remapping". For a token at
// absolute position m and pair i of group g with integer scale s_g:
//   normal                      query m                          key m
//   scaled, key dimension       query m // s + (w - w // s)      key m // s
//   scaled, not key dimension   query m                          key m
// Angle phi = float32(index) * inv_freq[i] in float32 (as Hugging Face
// computes it); sin/cos are full-range accurate (no fast-math intrinsics).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DPE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPE_HOST_DEVICE inline
#endif

namespace dpe {

// ---------------------------------------------------------------------------
// Index remap. All index arithmetic is 64-bit. m >= 0, scale >= 1, window >= 1
// (checked by the Python layer), so C++ truncating division equals floor.
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

// ---------------------------------------------------------------------------
// Parameter block filled by a launcher. Inputs are addressed by strides (so q
// and k may be views of one packed qkv tensor); the last dimension of q and k
// has stride 1. Outputs are contiguous (B, S, H, D), allocated by the launcher.
struct RopeParams {
  const void* q;           // q: (B, S, H_q, D)
  const void* k;           // k: (B, S, H_k, D)
  const void* positions;   // positions: (B, S), int32 or int64 (stride 0 allowed on B)
  const float* inv_freq;   // inv_freq: (P,)
  const int64_t* pair_scale;  // pair_scale: (P,), scale of the group of each pair
  const uint8_t* mask;     // mask: (H_m, P) contiguous, 1 = key dimension; nullptr = all pairs
  void* q_normal;          // (B, S, H_q, D)
  void* k_normal;          // (B, S, H_k, D)
  void* q_scaled;          // (B, S, H_q, D)
  void* k_scaled;          // (B, S, H_ks, D); H_ks = H_m if a mask is given, else H_k

  int64_t batch, seqlen, heads_q, heads_k, heads_ks, head_dim, num_pairs, window;
  int64_t mask_heads;      // H_m, or 0 without a mask
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t pos_stride_b, pos_stride_s;
  bool neox;

  DPE_HOST_DEVICE int64_t num_tokens() const { return batch * seqlen; }
  DPE_HOST_DEVICE int64_t rotary_dim() const { return 2 * num_pairs; }
  // Mask row used by query head h (per-query-head or per-KV-head mask).
  DPE_HOST_DEVICE int64_t q_mask_row(int64_t h) const { return h / (heads_q / mask_heads); }
  // KV head that feeds scaled key head j (j < H_ks; H_ks is H_k or H_q).
  DPE_HOST_DEVICE int64_t ks_source_head(int64_t j) const { return j / (heads_ks / heads_k); }
};

template <typename pos_t>
DPE_HOST_DEVICE int64_t token_position(const RopeParams& p, int64_t b, int64_t s) {
  const pos_t* pos = static_cast<const pos_t*>(p.positions);
  return static_cast<int64_t>(pos[b * p.pos_stride_b + s * p.pos_stride_s]);
}

}  // namespace dpe
