// CPU implementations of the dpe_kernels ops (torch launchers).
//
// torch.ops.dpe_kernels.rope(q, k, positions, inv_freq, pair_scale, mask,
//                            window, rotary_dim, is_neox)
//   -> (q_normal, k_normal, q_scaled, k_scaled)
// torch.ops.dpe_kernels.rope_out(..., q_normal, k_normal, q_scaled, k_scaled)
//   writes the same results into caller outputs of any strides (stride 1 on
//   head_dim); q_normal may be q and k_normal may be k (in place).
// torch.ops.dpe_kernels.rope_and_cache(q, k, v, positions, inv_freq,
//   pair_scale, mask, window, rotary_dim, is_neox, slot_mapping, k_cache,
//   ks_cache, v_cache, q_normal, q_scaled) -> ()
//   rotates and writes k_normal / k_scaled / v into paged caches at
//   slot_mapping[t] (negative: skipped), q_normal / q_scaled to the outputs.
//
// The schemas and fake (meta) implementations live in dpe_kernels/ops.py,
// which defines them before it loads this library: here only the CPU
// implementations are registered (TORCH_LIBRARY_IMPL). The CUDA ones are in
// rope_cuda.cu; the kernels in include/dpe/ (torch-free); the Python module that
// loads this library is binding.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

#include "dpe/rope_cpu.h"
#include "rope_launch.h"

namespace dpe {

// The torch-free kernel reads the tensors' bits through its own storage
// types (dpe::CpuScalar): c10::Half / c10::BFloat16 have the same layout.
static_assert(sizeof(c10::Half) == 2 && sizeof(c10::BFloat16) == 2, "16-bit storage");

// Host-value checks (positions >= 0, pair_scale >= 1, slots inside the
// cache: O(T + P) reads of host memory), then the tokens split over torch's
// intra-op threads. Each token costs about (H_q + H_k) * D elements of work;
// chunks of >= 16 tokens make the per-chunk scratch allocation noise.
inline void run_cpu(const KernelArgs& a, const char* op) {
  check_status(check_host_values(a), op);
  const int64_t grain = 16;
  at::parallel_for(0, a.num_tokens(), grain,
                   [&](int64_t begin, int64_t end) { rope_cpu_range(a, begin, end); });
}

void rope_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                  const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                  const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                  bool is_neox, at::Tensor& q_normal, at::Tensor& k_normal, at::Tensor& q_scaled,
                  at::Tensor& k_scaled) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "dpe_kernels::rope (CPU): q must be a CPU tensor");
  const RopeParams p = make_rope_params(q, k, positions, inv_freq, pair_scale, mask, window,
                                        rotary_dim, is_neox, q_normal, k_normal, q_scaled, k_scaled);
  KernelArgs a;
  check_status(validate_rope(p, &a), "dpe_kernels::rope");
  if (a.num_tokens() > 0) run_cpu(a, "dpe_kernels::rope");
}

// Fresh outputs are large (4 x T x H x D) and first touched by the kernel;
// at 4 KiB pages the page faults cost more than the rotation itself. Ask
// Linux for transparent huge pages on the 2 MiB-aligned interior of each
// buffer (advisory: ignored where THP is off; errors are harmless).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

RopeOutputs rope_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                        const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                        const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                        bool is_neox) {
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, "q must be [T, H_q, D] or [B, S, H_q, D], got ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim(), "k must have the rank of q (", q.dim(), "), got ", k.sizes());
  RopeOutputs out = alloc_rope_outputs(q, k, mask);
  advise_huge_pages(std::get<0>(out));
  advise_huge_pages(std::get<1>(out));
  advise_huge_pages(std::get<2>(out));
  advise_huge_pages(std::get<3>(out));
  rope_out_cpu(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
               std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  return out;
}

void rope_and_cache_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& positions, const at::Tensor& inv_freq,
                           const at::Tensor& pair_scale, const std::optional<at::Tensor>& mask,
                           int64_t window, int64_t rotary_dim, bool is_neox,
                           const at::Tensor& slot_mapping, at::Tensor& k_cache, at::Tensor& ks_cache,
                           at::Tensor& v_cache, at::Tensor& q_normal, at::Tensor& q_scaled) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "dpe_kernels::rope_and_cache (CPU): q must be a CPU tensor");
  const RopeCacheParams p =
      make_rope_cache_params(q, k, v, positions, inv_freq, pair_scale, mask, window, rotary_dim,
                             is_neox, slot_mapping, k_cache, ks_cache, v_cache, q_normal, q_scaled);
  KernelArgs a;
  check_status(validate_rope_and_cache(p, &a), "dpe_kernels::rope_and_cache");
  if (a.num_tokens() > 0) run_cpu(a, "dpe_kernels::rope_and_cache");
}

}  // namespace dpe

TORCH_LIBRARY_IMPL(dpe_kernels, CPU, m) {
  m.impl("rope", &dpe::rope_cpu_op);
  m.impl("rope_out", &dpe::rope_out_cpu);
  m.impl("rope_and_cache", &dpe::rope_and_cache_cpu_op);
}
