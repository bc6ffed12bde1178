// DPE rotary step on the CPU: a token-range kernel on raw pointers.
//
// No torch header: the launcher (csrc/rope.cpp) splits tokens across threads
// and calls rope_cpu_tokens on each range. Per token, sin/cos of the three
// angles are computed once per pair into a small scratch table and then
// reused by every head, so trigonometry costs O(T * P), not O(T * H * P).
// The per-head loop runs over contiguous pairs with no calls and no
// data-dependent control flow, so the compiler vectorises it.
#pragma once

#include <cstdint>
#include <vector>

#include "dpe/rope.h"

namespace dpe {

// Rotate one head vector x (D elements, pairs in layout NEOX) into the normal
// output y_n (skipped when WRITE_NORMAL is false) and the scaled output y_s.
// Scaled pairs use (cs, ss) where the mask row says "key dimension" (or
// everywhere without a mask) and the normal angle elsewhere.
template <typename scalar_t, bool NEOX, bool HAS_MASK, bool WRITE_NORMAL>
inline void rotate_head(const scalar_t* __restrict x, scalar_t* __restrict y_n,
                        scalar_t* __restrict y_s, const float* __restrict cn,
                        const float* __restrict sn, const float* __restrict cs,
                        const float* __restrict ss, const uint8_t* __restrict mask_row,
                        int64_t num_pairs, int64_t head_dim) {
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t i0 = pair_first(i, num_pairs, NEOX);
    const int64_t i1 = pair_second(i, num_pairs, NEOX);
    const float a = static_cast<float>(x[i0]);
    const float b = static_cast<float>(x[i1]);
    float o0, o1;
    if (WRITE_NORMAL) {
      rotate_pair(a, b, cn[i], sn[i], &o0, &o1);
      y_n[i0] = static_cast<scalar_t>(o0);
      y_n[i1] = static_cast<scalar_t>(o1);
    }
    float c = cs[i], s = ss[i];
    if (HAS_MASK) {
      const bool key_dim = mask_row[i] != 0;
      c = key_dim ? c : cn[i];
      s = key_dim ? s : sn[i];
    }
    rotate_pair(a, b, c, s, &o0, &o1);
    y_s[i0] = static_cast<scalar_t>(o0);
    y_s[i1] = static_cast<scalar_t>(o1);
  }
  // Dimensions past rotary_dim pass through unchanged (partial rotary).
  for (int64_t d = 2 * num_pairs; d < head_dim; ++d) {
    if (WRITE_NORMAL) y_n[d] = x[d];
    y_s[d] = x[d];
  }
}

template <typename scalar_t, typename pos_t, bool NEOX, bool HAS_MASK>
void rope_cpu_tokens_impl(const RopeParams& p, int64_t begin, int64_t end) {
  const int64_t P = p.num_pairs, D = p.head_dim;
  std::vector<float> scratch(static_cast<size_t>(6 * P));
  float* cn = scratch.data();
  float* sn = cn + P;
  float* cqs = sn + P;
  float* sqs = cqs + P;
  float* cks = sqs + P;
  float* sks = cks + P;

  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  const scalar_t* k = static_cast<const scalar_t*>(p.k);
  scalar_t* qn = static_cast<scalar_t*>(p.q_normal);
  scalar_t* kn = static_cast<scalar_t*>(p.k_normal);
  scalar_t* qs = static_cast<scalar_t*>(p.q_scaled);
  scalar_t* ks = static_cast<scalar_t*>(p.k_scaled);
  const int64_t rep = p.heads_ks / p.heads_k;

  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / p.seqlen, s = t % p.seqlen;
    const int64_t m = token_position<pos_t>(p, b, s);
    for (int64_t i = 0; i < P; ++i) {
      const PairTrig tr = pair_trig(m, p.inv_freq[i], p.pair_scale[i], p.window);
      cn[i] = tr.cos_n;
      sn[i] = tr.sin_n;
      cqs[i] = tr.cos_qs;
      sqs[i] = tr.sin_qs;
      cks[i] = tr.cos_ks;
      sks[i] = tr.sin_ks;
    }
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const scalar_t* x = q + b * p.q_stride_b + s * p.q_stride_s + h * p.q_stride_h;
      const int64_t out = (t * p.heads_q + h) * D;
      const uint8_t* mrow = HAS_MASK ? p.mask + p.q_mask_row(h) * P : nullptr;
      rotate_head<scalar_t, NEOX, HAS_MASK, true>(x, qn + out, qs + out, cn, sn, cqs, sqs, mrow,
                                                  P, D);
    }
    // Each KV head is read once; with a per-query-head mask it feeds `rep`
    // scaled key heads (k_scaled has H_q heads), written from the same read.
    for (int64_t hk = 0; hk < p.heads_k; ++hk) {
      const scalar_t* x = k + b * p.k_stride_b + s * p.k_stride_s + hk * p.k_stride_h;
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t j = hk * rep + r;
        const uint8_t* mrow = HAS_MASK ? p.mask + j * P : nullptr;
        scalar_t* ys = ks + (t * p.heads_ks + j) * D;
        if (r == 0) {
          rotate_head<scalar_t, NEOX, HAS_MASK, true>(x, kn + (t * p.heads_k + hk) * D, ys, cn,
                                                      sn, cks, sks, mrow, P, D);
        } else {
          rotate_head<scalar_t, NEOX, HAS_MASK, false>(x, nullptr, ys, cn, sn, cks, sks, mrow,
                                                       P, D);
        }
      }
    }
  }
}

// Process tokens [begin, end) of the flattened (B * S) token axis.
template <typename scalar_t, typename pos_t>
void rope_cpu_tokens(const RopeParams& p, int64_t begin, int64_t end) {
  const bool has_mask = p.mask != nullptr;
  if (p.neox) {
    if (has_mask) rope_cpu_tokens_impl<scalar_t, pos_t, true, true>(p, begin, end);
    else rope_cpu_tokens_impl<scalar_t, pos_t, true, false>(p, begin, end);
  } else {
    if (has_mask) rope_cpu_tokens_impl<scalar_t, pos_t, false, true>(p, begin, end);
    else rope_cpu_tokens_impl<scalar_t, pos_t, false, false>(p, begin, end);
  }
}

}  // namespace dpe
