// DPE rotary step on CUDA: the kernel, on raw pointers (no torch header).
//
// One thread owns one (token, pair). It computes the three sin/cos pairs of
// SPEC "Position remapping" once (dpe::pair_trig, the same function the CPU
// backend calls) and reuses them for every query and key head of that token.
// Threads of a warp hold consecutive pairs, so each head's loads and stores
// are coalesced (neox: consecutive elements; gptj: consecutive element pairs).
#pragma once

#include <cstdint>

#include "dpe/rope.h"

namespace dpe {

template <typename scalar_t, bool NEOX>
__device__ __forceinline__ void rotate_store(const scalar_t* x, scalar_t* y, int64_t i,
                                             int64_t P, float c, float s) {
  const int64_t i0 = pair_first(i, P, NEOX), i1 = pair_second(i, P, NEOX);
  float o0, o1;
  rotate_pair(static_cast<float>(x[i0]), static_cast<float>(x[i1]), c, s, &o0, &o1);
  y[i0] = static_cast<scalar_t>(o0);
  y[i1] = static_cast<scalar_t>(o1);
}

// blockDim = (PAIR_THREADS, TOKENS_PER_BLOCK); grid.x = ceil(T / TOKENS_PER_BLOCK).
template <typename scalar_t, typename pos_t, bool NEOX>
__global__ void rope_cuda_kernel(const RopeParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.num_tokens()) return;
  const int64_t b = t / p.seqlen, s = t % p.seqlen;
  const int64_t m = token_position<pos_t>(p, b, s);
  const int64_t P = p.num_pairs, D = p.head_dim;
  const bool has_mask = p.mask != nullptr;
  const int64_t rep = p.heads_ks / p.heads_k;

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride_b + s * p.q_stride_s;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride_b + s * p.k_stride_s;
  scalar_t* qn = static_cast<scalar_t*>(p.q_normal) + t * p.heads_q * D;
  scalar_t* qs = static_cast<scalar_t*>(p.q_scaled) + t * p.heads_q * D;
  scalar_t* kn = static_cast<scalar_t*>(p.k_normal) + t * p.heads_k * D;
  scalar_t* ks = static_cast<scalar_t*>(p.k_scaled) + t * p.heads_ks * D;

  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const PairTrig tr = pair_trig(m, p.inv_freq[i], p.pair_scale[i], p.window);
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const scalar_t* x = q + h * p.q_stride_h;
      rotate_store<scalar_t, NEOX>(x, qn + h * D, i, P, tr.cos_n, tr.sin_n);
      const bool key_dim = !has_mask || p.mask[p.q_mask_row(h) * P + i];
      rotate_store<scalar_t, NEOX>(x, qs + h * D, i, P, key_dim ? tr.cos_qs : tr.cos_n,
                                   key_dim ? tr.sin_qs : tr.sin_n);
    }
    for (int64_t hk = 0; hk < p.heads_k; ++hk) {
      const scalar_t* x = k + hk * p.k_stride_h;
      rotate_store<scalar_t, NEOX>(x, kn + hk * D, i, P, tr.cos_n, tr.sin_n);
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t j = hk * rep + r;
        const bool key_dim = !has_mask || p.mask[j * P + i];
        rotate_store<scalar_t, NEOX>(x, ks + j * D, i, P, key_dim ? tr.cos_ks : tr.cos_n,
                                     key_dim ? tr.sin_ks : tr.sin_n);
      }
    }
  }
  // Partial rotary: dimensions [2P, D) pass through to every output.
  for (int64_t d = 2 * P + threadIdx.x; d < D; d += blockDim.x) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const scalar_t v = q[h * p.q_stride_h + d];
      qn[h * D + d] = v;
      qs[h * D + d] = v;
    }
    for (int64_t hk = 0; hk < p.heads_k; ++hk) {
      const scalar_t v = k[hk * p.k_stride_h + d];
      kn[hk * D + d] = v;
      for (int64_t r = 0; r < rep; ++r) ks[(hk * rep + r) * D + d] = v;
    }
  }
}

// Launch geometry: 32 pair-threads (one warp across pairs; a head_dim-128
// model has 64 pairs, so each thread handles two) by 4 tokens per block.
constexpr int kPairThreads = 32;
constexpr int kTokensPerBlock = 4;

template <typename scalar_t, typename pos_t>
inline cudaError_t launch_rope_cuda(const RopeParams& p, cudaStream_t stream) {
  const int64_t T = p.num_tokens();
  if (T == 0) return cudaSuccess;
  const dim3 block(kPairThreads, kTokensPerBlock);
  const int64_t blocks = (T + kTokensPerBlock - 1) / kTokensPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(blocks));
  if (p.neox) {
    rope_cuda_kernel<scalar_t, pos_t, true><<<grid, block, 0, stream>>>(p);
  } else {
    rope_cuda_kernel<scalar_t, pos_t, false><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace dpe
