// CUDA launcher of the rope op: tensors in, dpe::launch_rope_cuda out.
// Schema and CPU implementation: rope.cpp. Kernel: include/dpe/rope_cuda.cuh.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dpe/rope_cuda.cuh"
#include "rope_launch.h"

namespace dpe {

void rope_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                   const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                   const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                   bool is_neox, at::Tensor& q_normal, at::Tensor& k_normal, at::Tensor& q_scaled,
                   at::Tensor& k_scaled) {
  TORCH_CHECK_VALUE(q.is_cuda(), "rope_cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const RopeParams p = make_rope_params(q, k, positions, inv_freq, pair_scale, mask, window,
                                        rotary_dim, is_neox, {q_normal, k_normal, q_scaled, k_scaled});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DPE_DISPATCH_FLOAT_TYPES(q.scalar_type(), "dpe_rope_cuda", [&] {
    const cudaError_t err = positions.scalar_type() == at::kInt
                                ? launch_rope_cuda<scalar_t, int32_t>(p, stream)
                                : launch_rope_cuda<scalar_t, int64_t>(p, stream);
    TORCH_CHECK(err == cudaSuccess, "dpe rope CUDA launch failed: ", cudaGetErrorString(err));
  });
}

RopeOutputs rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                      const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                      bool is_neox) {
  RopeOutputs out = alloc_rope_outputs(q, k, mask);
  rope_out_cuda(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
                std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  return out;
}

}  // namespace dpe

TORCH_LIBRARY_IMPL(dpe_kernels, CUDA, m) {
  m.impl("rope", &dpe::rope_cuda);
  m.impl("rope_out", &dpe::rope_out_cuda);
}
