// CPU launcher of the rope op and the op's schema.
//
// torch.ops.dpe_kernels.rope(q, k, positions, inv_freq, pair_scale, mask,
//                            window, rotary_dim, is_neox)
//   -> (q_normal, k_normal, q_scaled, k_scaled)
// The fake (meta) implementation lives in dpe_kernels/_ops.py; the CUDA
// implementation in rope.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "dpe/rope_cpu.h"
#include "rope_launch.h"

namespace dpe {

RopeOutputs rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                     const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                     const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                     bool is_neox) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "rope_cpu: q must be a CPU tensor");
  RopeLaunch L =
      make_rope_launch(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox);
  const RopeParams p = L.params;
  // Each token costs about (H_q + H_k) * D elements of work; keep chunks large
  // enough (>= 16 tokens) that the per-chunk scratch allocation is noise.
  const int64_t grain = 16;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dpe_rope_cpu", [&] {
    if (positions.scalar_type() == at::kInt) {
      at::parallel_for(0, p.num_tokens(), grain, [&](int64_t begin, int64_t end) {
        rope_cpu_tokens<scalar_t, int32_t>(p, begin, end);
      });
    } else {
      at::parallel_for(0, p.num_tokens(), grain, [&](int64_t begin, int64_t end) {
        rope_cpu_tokens<scalar_t, int64_t>(p, begin, end);
      });
    }
  });
  return L.outputs;
}

}  // namespace dpe

TORCH_LIBRARY(dpe_kernels, m) {
  m.def(
      "rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, Tensor pair_scale, "
      "Tensor? mask, int window, int rotary_dim, bool is_neox) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpe_kernels, CPU, m) { m.impl("rope", &dpe::rope_cpu); }

// The module only loads the shared library, which registers the ops above.
PYBIND11_MODULE(_C, m) { m.doc() = "dpe_kernels compiled ops (registered in torch.ops.dpe_kernels)"; }
