// Tensor-side half of the rope op, shared by the CPU (rope.cpp) and CUDA
// (rope_cuda.cu) launchers: argument checks, output allocation, and the fill of
// dpe::RopeParams. The Python layer (dpe_kernels/rope.py) validates first
// and raises ValueError/TypeError naming the argument; these checks are the
// same contract for callers that reach torch.ops.dpe_kernels.rope directly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <vector>
#include <tuple>

#include "dpe/rope.h"

// float32, float16, bfloat16 only (the dtypes the op accepts): no dead double kernels.
#define DPE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace dpe {

using RopeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shape of the outputs: the leading dims of q, `heads`, head_dim.
inline std::vector<int64_t> rope_output_shape(const at::Tensor& q, int64_t heads) {
  std::vector<int64_t> s(q.sizes().begin(), q.sizes().end() - 2);
  s.push_back(heads);
  s.push_back(q.size(-1));
  return s;
}

// Heads of k_scaled: H_m with a mask (H_q for a per-query-head mask), else H_k.
inline int64_t scaled_key_heads(const at::Tensor& k, const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->size(0) : k.size(-2);
}

inline RopeOutputs alloc_rope_outputs(const at::Tensor& q, const at::Tensor& k,
                                      const std::optional<at::Tensor>& mask) {
  auto opts = q.options();
  return {at::empty(rope_output_shape(q, q.size(-2)), opts),
          at::empty(rope_output_shape(q, k.size(-2)), opts),
          at::empty(rope_output_shape(q, q.size(-2)), opts),
          at::empty(rope_output_shape(q, scaled_key_heads(k, mask)), opts)};
}

// Checks every argument and fills the parameter block for the given outputs
// (contiguous, dtype and device of q, shapes of alloc_rope_outputs).
inline RopeParams make_rope_params(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& positions, const at::Tensor& inv_freq,
                                   const at::Tensor& pair_scale,
                                   const std::optional<at::Tensor>& mask, int64_t window,
                                   int64_t rotary_dim, bool is_neox, const RopeOutputs& out) {
  // q: (T, H_q, D) or (B, S, H_q, D); k: same leading shape with H_k heads
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, "q must be (T, H_q, D) or (B, S, H_q, D)");
  TORCH_CHECK_VALUE(k.dim() == q.dim(), "k must have the same rank as q");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                       q.scalar_type() == at::kBFloat16,
                   "q must be float32, float16 or bfloat16");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q");
  const bool packed = q.dim() == 3;
  const int64_t B = packed ? 1 : q.size(0);
  const int64_t S = packed ? q.size(0) : q.size(1);
  const int64_t Hq = q.size(-2), Hk = k.size(-2), D = q.size(-1);
  for (int64_t d = 0; d < q.dim() - 2; ++d) {
    TORCH_CHECK_VALUE(k.size(d) == q.size(d), "k must have the token dims of q");
  }
  TORCH_CHECK_VALUE(k.size(-1) == D, "k must have the head_dim of q");
  TORCH_CHECK_VALUE(Hk > 0 && Hq % Hk == 0, "H_q must be a multiple of H_k");
  TORCH_CHECK_VALUE(q.stride(-1) == 1 && k.stride(-1) == 1, "q and k need stride 1 on head_dim");
  // rotary_dim: even, 2 <= R <= D; inv_freq: (R / 2,) float32; pair_scale: (R / 2,) int64
  TORCH_CHECK_VALUE(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= D,
                    "rotary_dim must be even and in [2, head_dim]");
  const int64_t P = rotary_dim / 2;
  TORCH_CHECK_TYPE(inv_freq.scalar_type() == at::kFloat, "inv_freq must be float32");
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.size(0) == P && inv_freq.is_contiguous(),
                    "inv_freq must be contiguous (rotary_dim / 2,)");
  TORCH_CHECK_TYPE(pair_scale.scalar_type() == at::kLong, "pair_scale must be int64");
  TORCH_CHECK_VALUE(pair_scale.dim() == 1 && pair_scale.size(0) == P && pair_scale.is_contiguous(),
                    "pair_scale must be contiguous (rotary_dim / 2,)");
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1");
  // positions: (T,) for packed q, (B, S) or (1, S) for batched q; int32 or int64
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
                   "positions must be int32 or int64");
  int64_t pos_sb = 0, pos_ss = 0;
  if (packed) {
    TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == S, "positions must be (T,)");
    pos_ss = positions.stride(0);
  } else {
    TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(1) == S &&
                          (positions.size(0) == B || positions.size(0) == 1),
                      "positions must be (B, S) or (1, S)");
    pos_sb = positions.size(0) == 1 ? 0 : positions.stride(0);
    pos_ss = positions.stride(1);
  }
  // mask: (H_m, P) bool, H_m in {H_q, H_k}; scaled keys get H_m heads
  int64_t Hm = 0;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool");
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(1) == P && mask->is_contiguous() &&
                          (mask->size(0) == Hq || mask->size(0) == Hk),
                      "mask must be contiguous (H_q or H_k, rotary_dim / 2)");
    Hm = mask->size(0);
  }
  const int64_t Hks = Hm > 0 ? Hm : Hk;
  for (const at::Tensor* t : {&k, &positions, &inv_freq, &pair_scale}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), "all tensors must be on the device of q");
  }
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->device() == q.device(), "mask must be on the device of q");
  }

  const char* names[4] = {"q_normal", "k_normal", "q_scaled", "k_scaled"};
  const at::Tensor* outs[4] = {&std::get<0>(out), &std::get<1>(out), &std::get<2>(out),
                               &std::get<3>(out)};
  const int64_t heads[4] = {Hq, Hk, Hq, Hks};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& o = *outs[i];
    TORCH_CHECK_VALUE(o.sizes() == at::IntArrayRef(rope_output_shape(q, heads[i])) &&
                          o.is_contiguous() && o.scalar_type() == q.scalar_type() &&
                          o.device() == q.device(),
                      names[i], " must be contiguous, with the dtype and device of q and shape ",
                      at::IntArrayRef(rope_output_shape(q, heads[i])));
  }
  const at::Tensor &qn = std::get<0>(out), &kn = std::get<1>(out), &qs = std::get<2>(out),
                   &ks = std::get<3>(out);

  RopeParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.positions = positions.data_ptr();
  p.inv_freq = inv_freq.data_ptr<float>();
  p.pair_scale = pair_scale.data_ptr<int64_t>();
  p.mask = mask.has_value() ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
  p.q_normal = qn.data_ptr();
  p.k_normal = kn.data_ptr();
  p.q_scaled = qs.data_ptr();
  p.k_scaled = ks.data_ptr();
  p.batch = B;
  p.seqlen = S;
  p.heads_q = Hq;
  p.heads_k = Hk;
  p.heads_ks = Hks;
  p.head_dim = D;
  p.num_pairs = P;
  p.window = window;
  p.mask_heads = Hm;
  p.q_stride_b = packed ? 0 : q.stride(0);
  p.q_stride_s = q.stride(-3);
  p.q_stride_h = q.stride(-2);
  p.k_stride_b = packed ? 0 : k.stride(0);
  p.k_stride_s = k.stride(-3);
  p.k_stride_h = k.stride(-2);
  p.pos_stride_b = pos_sb;
  p.pos_stride_s = pos_ss;
  p.neox = is_neox;
  return p;
}

}  // namespace dpe
