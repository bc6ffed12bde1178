// DPE rotary step on CUDA: header-only, torch-free entry points.
//
//   dpe::Status dpe::rope_cuda(const RopeParams&, cudaStream_t);
//   dpe::Status dpe::rope_and_cache_cuda(const RopeCacheParams&, cudaStream_t);
//
// Both validate their arguments on the host (dpe/rope.h; no tensor value is
// read, nothing synchronises) and enqueue one kernel on `stream`. Every
// pointer is device memory. Values the host cannot see are the caller's
// contract: positions >= 0, pair_scale >= 1, slots < num_blocks * block_size
// (a slot outside the cache is skipped, never written, but not reported).
//
// Kernel: one thread owns one (token, pair). It computes the three sin/cos
// pairs of "Position remapping" (docs/method.md) once (dpe::pair_trig, dpe/rope.h) and
// reuses them for every query and key head of that token. Threads of a warp hold consecutive pairs, so each
// head's loads and stores are coalesced (neox: consecutive elements; gptj:
// consecutive element pairs). Each pair is loaded once into registers before
// any output of it is stored, and no thread touches another's elements, so
// q_normal may alias q and k_normal may alias k (in place). The same kernel
// serves rope_and_cache: the key outputs of token t go to the caches at
// slot_mapping[t], and the token's threads also copy its v row to v_cache.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dpe/rope.h"

namespace dpe {

// float <-> storage conversions by intrinsic, not by the types' conversion
// operators (torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ float load_float(float x) { return x; }
__device__ __forceinline__ float load_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float load_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t store_float(float x);
template <>
__device__ __forceinline__ float store_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half store_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename scalar_t>
__device__ __forceinline__ void store_pair(scalar_t* y, int64_t i0, int64_t i1, float a, float b,
                                           float c, float s) {
  float o0, o1;
  rotate_pair(a, b, c, s, &o0, &o1);
  y[i0] = store_float<scalar_t>(o0);
  y[i1] = store_float<scalar_t>(o1);
}

// blockDim = (kPairThreads, kTokensPerBlock); grid.x = ceil(T / kTokensPerBlock).
template <typename scalar_t, typename pos_t, bool NEOX>
__global__ void rope_cuda_kernel(const KernelArgs p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.num_tokens()) return;
  const int64_t b = t / p.seqlen, s = t % p.seqlen;
  const int64_t m = p.position<pos_t>(b, s);
  const int64_t P = p.num_pairs, D = p.head_dim;
  const bool has_mask = p.mask != nullptr;
  const int64_t rep = p.ks_rep();
  int64_t ko = 0, ki = 0;
  const bool write_k = p.key_row(b, s, &ko, &ki);  // false: negative slot, skip the caches

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + p.q_rows.at(b, s, 0);
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + p.k_rows.at(b, s, 0);
  scalar_t* qn = static_cast<scalar_t*>(p.q_normal) + p.qn_rows.at(b, s, 0);
  scalar_t* qs = static_cast<scalar_t*>(p.q_scaled) + p.qs_rows.at(b, s, 0);
  scalar_t* kn = static_cast<scalar_t*>(p.k_normal) + (write_k ? p.kn_rows.at(ko, ki, 0) : 0);
  scalar_t* ks = static_cast<scalar_t*>(p.k_scaled) + (write_k ? p.ks_rows.at(ko, ki, 0) : 0);

  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    const PairTrig tr = pair_trig(m, p.inv_freq[i], p.pair_scale[i], p.window);
    const int64_t i0 = pair_first(i, P, NEOX), i1 = pair_second(i, P, NEOX);
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const scalar_t* x = q + h * p.q_rows.head;
      const float a = load_float(x[i0]), c = load_float(x[i1]);  // both loads before any store
      const bool key_dim = !has_mask || p.mask[p.q_mask_row(h) * P + i];
      store_pair(qn + h * p.qn_rows.head, i0, i1, a, c, tr.cos_n, tr.sin_n);
      store_pair(qs + h * p.qs_rows.head, i0, i1, a, c, key_dim ? tr.cos_qs : tr.cos_n,
                 key_dim ? tr.sin_qs : tr.sin_n);
    }
    if (!write_k) continue;
    for (int64_t hk = 0; hk < p.heads_k; ++hk) {
      const scalar_t* x = k + hk * p.k_rows.head;
      const float a = load_float(x[i0]), c = load_float(x[i1]);
      store_pair(kn + hk * p.kn_rows.head, i0, i1, a, c, tr.cos_n, tr.sin_n);
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t j = hk * rep + r;
        const bool key_dim = !has_mask || p.mask[j * P + i];
        store_pair(ks + j * p.ks_rows.head, i0, i1, a, c, key_dim ? tr.cos_ks : tr.cos_n,
                   key_dim ? tr.sin_ks : tr.sin_n);
      }
    }
  }
  // Partial rotary: dimensions [2P, D) pass through to every output (already
  // in place in an aliased normal output).
  for (int64_t d = 2 * P + threadIdx.x; d < D; d += blockDim.x) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const scalar_t x = q[h * p.q_rows.head + d];
      if (!p.q_in_place) qn[h * p.qn_rows.head + d] = x;
      qs[h * p.qs_rows.head + d] = x;
    }
    if (!write_k) continue;
    for (int64_t hk = 0; hk < p.heads_k; ++hk) {
      const scalar_t x = k[hk * p.k_rows.head + d];
      if (!p.k_in_place) kn[hk * p.kn_rows.head + d] = x;
      for (int64_t r = 0; r < rep; ++r) ks[(hk * rep + r) * p.ks_rows.head + d] = x;
    }
  }
  // rope_and_cache: the token's v row to v_cache, unchanged.
  if (write_k && p.v_cache != nullptr) {
    const scalar_t* v = static_cast<const scalar_t*>(p.v);
    scalar_t* vc = static_cast<scalar_t*>(p.v_cache);
    const int64_t Dv = p.v_head_dim;
    for (int64_t e = threadIdx.x; e < p.heads_k * Dv; e += blockDim.x) {
      const int64_t hk = e / Dv, d = e % Dv;
      vc[p.vc_rows.at(ko, ki, hk) + d] = v[p.v_rows.at(b, s, hk) + d];
    }
  }
}

// Launch geometry: 32 pair-threads (one warp across pairs; a head_dim-128
// model has 64 pairs, so each thread handles two) by 4 tokens per block.
constexpr int kPairThreads = 32;
constexpr int kTokensPerBlock = 4;

template <typename scalar_t, typename pos_t>
inline cudaError_t launch_rope_kernel(const KernelArgs& p, cudaStream_t stream) {
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

template <typename scalar_t>
inline cudaError_t launch_rope_kernel_pos(const KernelArgs& p, cudaStream_t stream) {
  return p.pos_type == IndexType::kInt32 ? launch_rope_kernel<scalar_t, int32_t>(p, stream)
                                         : launch_rope_kernel<scalar_t, int64_t>(p, stream);
}

/// Enqueue the kernel for prepared arguments (validate_rope /
/// validate_rope_and_cache); returns the launch's cudaError_t.
inline cudaError_t launch_rope_cuda(const KernelArgs& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_rope_kernel_pos<float>(p, stream);
    case DType::kFloat16: return launch_rope_kernel_pos<__half>(p, stream);
    case DType::kBFloat16: return launch_rope_kernel_pos<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

inline Status launch_status(cudaError_t err) {
  if (err == cudaSuccess) return ok_status();
  return error(ErrorCode::kLaunchError, cudaGetErrorString(err));
}

/// Op `rope` on CUDA: enqueue the rotation of q and k into q_normal,
/// k_normal, q_scaled and k_scaled (see RopeParams) on `stream`.
/// @param p       the arguments, device pointers (validated here, no sync)
/// @param stream  the stream to enqueue on (0: the legacy default stream)
/// @return        Status{kOk}, the first invalid argument (nothing enqueued),
///                or kLaunchError with cudaGetErrorString's message.
inline Status rope_cuda(const RopeParams& p, cudaStream_t stream) {
  KernelArgs a;
  const Status st = validate_rope(p, &a);
  if (!st.ok()) return st;
  return launch_status(launch_rope_cuda(a, stream));
}

/// Op `rope_and_cache` on CUDA: enqueue the rotation of q and k of T tokens,
/// the q outputs, and the k_normal / k_scaled / v writes into the paged
/// caches at slot_mapping[t] (negative or >= num_blocks * block_size:
/// skipped) on `stream`.
/// @param p       the arguments, device pointers (validated here, no sync)
/// @param stream  the stream to enqueue on
/// @return        as rope_cuda
inline Status rope_and_cache_cuda(const RopeCacheParams& p, cudaStream_t stream) {
  KernelArgs a;
  const Status st = validate_rope_and_cache(p, &a);
  if (!st.ok()) return st;
  return launch_status(launch_rope_cuda(a, stream));
}

}  // namespace dpe
