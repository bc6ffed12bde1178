// CUDA implementations of the dpe_kernels ops: tensors in, the torch-free
// entry points dpe::rope_cuda / dpe::rope_and_cache_cuda
// (include/dpe/rope_cuda.cuh) out, on the current stream. Schemas and fakes:
// dpe_kernels/ops.py; CPU implementations: rope.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dpe/rope_cuda.cuh"
#include "rope_launch.h"

namespace dpe {

// c10::Half / c10::BFloat16 are bit-compatible with __half / __nv_bfloat16,
// which the kernel reads through conversion intrinsics.
static_assert(sizeof(c10::Half) == sizeof(__half) && sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "16-bit storage");

void rope_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                   const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                   const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                   bool is_neox, at::Tensor& q_normal, at::Tensor& k_normal, at::Tensor& q_scaled,
                   at::Tensor& k_scaled) {
  TORCH_CHECK_VALUE(q.is_cuda(), "dpe_kernels::rope (CUDA): q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const RopeParams p = make_rope_params(q, k, positions, inv_freq, pair_scale, mask, window,
                                        rotary_dim, is_neox, q_normal, k_normal, q_scaled, k_scaled);
  KernelArgs a;
  check_status(validate_rope(p, &a), "dpe_kernels::rope");
  const Status st = launch_status(launch_rope_cuda(a, c10::cuda::getCurrentCUDAStream()));
  TORCH_CHECK(st.ok(), "dpe_kernels::rope (CUDA): ", st.message);
}

RopeOutputs rope_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                         const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                         const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                         bool is_neox) {
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, "q must be [T, H_q, D] or [B, S, H_q, D], got ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim(), "k must have the rank of q (", q.dim(), "), got ", k.sizes());
  RopeOutputs out = alloc_rope_outputs(q, k, mask);
  rope_out_cuda(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
                std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  return out;
}

void rope_and_cache_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& positions, const at::Tensor& inv_freq,
                            const at::Tensor& pair_scale, const std::optional<at::Tensor>& mask,
                            int64_t window, int64_t rotary_dim, bool is_neox,
                            const at::Tensor& slot_mapping, at::Tensor& k_cache,
                            at::Tensor& ks_cache, at::Tensor& v_cache, at::Tensor& q_normal,
                            at::Tensor& q_scaled) {
  TORCH_CHECK_VALUE(q.is_cuda(), "dpe_kernels::rope_and_cache (CUDA): q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const RopeCacheParams p =
      make_rope_cache_params(q, k, v, positions, inv_freq, pair_scale, mask, window, rotary_dim,
                             is_neox, slot_mapping, k_cache, ks_cache, v_cache, q_normal, q_scaled);
  KernelArgs a;
  check_status(validate_rope_and_cache(p, &a), "dpe_kernels::rope_and_cache");
  const Status st = launch_status(launch_rope_cuda(a, c10::cuda::getCurrentCUDAStream()));
  TORCH_CHECK(st.ok(), "dpe_kernels::rope_and_cache (CUDA): ", st.message);
}

}  // namespace dpe

TORCH_LIBRARY_IMPL(dpe_kernels, CUDA, m) {
  m.impl("rope", &dpe::rope_cuda_op);
  m.impl("rope_out", &dpe::rope_out_cuda);
  m.impl("rope_and_cache", &dpe::rope_and_cache_cuda_op);
}
