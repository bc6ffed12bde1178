// CPU launcher of the rope op and the op's schema.
//
// torch.ops.dpe_kernels.rope(q, k, positions, inv_freq, pair_scale, mask,
//                            window, rotary_dim, is_neox)
//   -> (q_normal, k_normal, q_scaled, k_scaled)
// torch.ops.dpe_kernels.rope_out(..., q_normal, k_normal, q_scaled, k_scaled)
//   writes the same results into caller-provided contiguous outputs.
// The fake (meta) implementation lives in dpe_kernels/_ops.py; the CUDA
// implementation in rope_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

#include "dpe/rope_cpu.h"
#include "rope_launch.h"

namespace dpe {

// Element type the CPU kernel computes on (same bits as the tensor's). Half
// maps to the compiler's _Float16 where it has one (GCC >= 12 on x86-64):
// its conversions vectorise (F16C in the AVX2 build) where c10::Half's
// branchy software conversion does not. BFloat16 maps to bf16_storage for
// the same reason.
template <typename T>
struct CpuStorage {
  using type = T;
};
#if defined(__x86_64__) && defined(__FLT16_MAX__)
template <>
struct CpuStorage<c10::Half> {
  using type = _Float16;
};
static_assert(sizeof(_Float16) == sizeof(c10::Half), "half storage");
#endif
template <>
struct CpuStorage<c10::BFloat16> {
  using type = bf16_storage;  // same bits, branch-free conversions (rope_cpu.h)
};


void rope_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                  const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                  const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                  bool is_neox, at::Tensor& q_normal, at::Tensor& k_normal, at::Tensor& q_scaled,
                  at::Tensor& k_scaled) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "rope_cpu: q must be a CPU tensor");
  const RopeParams p = make_rope_params(q, k, positions, inv_freq, pair_scale, mask, window,
                                        rotary_dim, is_neox, {q_normal, k_normal, q_scaled, k_scaled});
  // Each token costs about (H_q + H_k) * D elements of work; chunks of >= 16
  // tokens make the per-chunk scratch allocation noise.
  const int64_t grain = 16;
  DPE_DISPATCH_FLOAT_TYPES(q.scalar_type(), "dpe_rope_cpu", [&] {
    if (positions.scalar_type() == at::kInt) {
      at::parallel_for(0, p.num_tokens(), grain, [&](int64_t begin, int64_t end) {
        rope_cpu_tokens<typename CpuStorage<scalar_t>::type, int32_t>(p, begin, end);
      });
    } else {
      at::parallel_for(0, p.num_tokens(), grain, [&](int64_t begin, int64_t end) {
        rope_cpu_tokens<typename CpuStorage<scalar_t>::type, int64_t>(p, begin, end);
      });
    }
  });
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

RopeOutputs rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                     const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                     const std::optional<at::Tensor>& mask, int64_t window, int64_t rotary_dim,
                     bool is_neox) {
  RopeOutputs out = alloc_rope_outputs(q, k, mask);
  advise_huge_pages(std::get<0>(out));
  advise_huge_pages(std::get<1>(out));
  advise_huge_pages(std::get<2>(out));
  advise_huge_pages(std::get<3>(out));
  rope_out_cpu(q, k, positions, inv_freq, pair_scale, mask, window, rotary_dim, is_neox,
               std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out));
  return out;
}

}  // namespace dpe

TORCH_LIBRARY(dpe_kernels, m) {
  m.def(
      "rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, Tensor pair_scale, "
      "Tensor? mask, int window, int rotary_dim, bool is_neox) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rope_out(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, Tensor pair_scale, "
      "Tensor? mask, int window, int rotary_dim, bool is_neox, Tensor(a!) q_normal, "
      "Tensor(b!) k_normal, Tensor(c!) q_scaled, Tensor(d!) k_scaled) -> ()");
}

TORCH_LIBRARY_IMPL(dpe_kernels, CPU, m) {
  m.impl("rope", &dpe::rope_cpu);
  m.impl("rope_out", &dpe::rope_out_cpu);
}

// The module only loads the shared library, which registers the ops above.
PYBIND11_MODULE(_C, m) { m.doc() = "dpe_kernels compiled ops (registered in torch.ops.dpe_kernels)"; }
