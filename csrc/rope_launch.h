// Tensor-side half of the ops, shared by the CPU (rope.cpp, paged_decode.cpp) and
// CUDA (rope_cuda.cu) launchers: tensor checks, output allocation, and the fill
// of the torch-free argument blocks dpe::RopeParams / dpe::RopeCacheParams
// (dpe/rope.h); the launchers run the torch-free validation once, on the filled block. The Python layer
// (dpe_kernels/rope.py) validates first and raises ValueError/TypeError
// naming the argument; these checks are the same contract for callers that
// reach torch.ops.dpe_kernels.* directly (TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError).
//
// The op schemas live in Python (dpe_kernels/ops.py, defined before this
// library loads); the C++ side only registers implementations per device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dpe/rope.h"

namespace dpe {

using RopeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

inline IndexType to_index_type(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got ", t.scalar_type());
  return t.scalar_type() == at::kInt ? IndexType::kInt32 : IndexType::kInt64;
}

// Raise the torch-free validator's error as a ValueError naming the argument.
inline void check_status(const Status& st, const char* op) {
  TORCH_CHECK_VALUE(st.ok(), op, ": ", st.message, " (", error_code_name(st.code), ")");
}

// Shape of an output: the leading dims of q, `heads`, head_dim.
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

// (batch, token, head) strides of a [T, H, D] (batch 0) or [B, S, H, D] tensor.
inline RowStrides row_strides(const at::Tensor& t) {
  if (t.dim() == 3) return RowStrides{0, t.stride(0), t.stride(1)};
  return RowStrides{t.stride(0), t.stride(1), t.stride(2)};
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) <= 1, name,
                    " must have stride 1 on its last (head_dim) dimension, got strides ", t.strides());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on the device of q (", q.device(),
                    "), got ", t.device());
}

// Checks shared by both ops: inv_freq, pair_scale, mask, window, rotary_dim.
// Returns the mask heads (0 without a mask).
inline int64_t check_rope_config(const at::Tensor& q, int64_t Hq, int64_t Hk, const at::Tensor& inv_freq,
                                 const at::Tensor& pair_scale, const std::optional<at::Tensor>& mask,
                                 int64_t window, int64_t rotary_dim) {
  const int64_t D = q.size(-1);
  TORCH_CHECK_VALUE(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= D,
                    "rotary_dim must be even and in [2, head_dim=", D, "], got ", rotary_dim);
  const int64_t P = rotary_dim / 2;
  TORCH_CHECK_TYPE(inv_freq.scalar_type() == at::kFloat, "inv_freq must be float32, got ",
                   inv_freq.scalar_type());
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.size(0) == P && inv_freq.is_contiguous(),
                    "inv_freq must be contiguous [rotary_dim / 2] = [", P, "], got ", inv_freq.sizes());
  TORCH_CHECK_TYPE(pair_scale.scalar_type() == at::kLong, "pair_scale must be int64, got ",
                   pair_scale.scalar_type());
  TORCH_CHECK_VALUE(pair_scale.dim() == 1 && pair_scale.size(0) == P && pair_scale.is_contiguous(),
                    "pair_scale must be contiguous [rotary_dim / 2] = [", P, "], got ", pair_scale.sizes());
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window);
  check_same_device(inv_freq, q, "inv_freq");
  check_same_device(pair_scale, q, "pair_scale");
  if (!mask.has_value()) return 0;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(1) == P && mask->is_contiguous() &&
                        (mask->size(0) == Hq || mask->size(0) == Hk),
                    "mask must be contiguous [H_q=", Hq, " or H_k=", Hk, ", P=", P, "], got ",
                    mask->sizes());
  check_same_device(*mask, q, "mask");
  return mask->size(0);
}

inline const uint8_t* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
}

// The fields both argument blocks share (the same names in RopeParams and RopeCacheParams):
// filled once here for both ops.
template <class Params>
inline void fill_shared(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                        const at::Tensor& inv_freq, const at::Tensor& pair_scale,
                        const std::optional<at::Tensor>& mask, int64_t mask_heads, const at::Tensor& q_normal,
                        const at::Tensor& q_scaled, int64_t rotary_dim, int64_t window, bool is_neox, DType dtype,
                        IndexType pos_type) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.positions = positions.data_ptr();
  p.inv_freq = inv_freq.data_ptr<float>();
  p.pair_scale = pair_scale.data_ptr<int64_t>();
  p.mask = mask_ptr(mask);
  p.mask_heads = mask_heads;
  p.q_normal = q_normal.data_ptr();
  p.q_scaled = q_scaled.data_ptr();
  p.heads_q = q.size(-2);
  p.heads_k = k.size(-2);
  p.head_dim = q.size(-1);
  p.rotary_dim = rotary_dim;
  p.window = window;
  p.dtype = dtype;
  p.pos_type = pos_type;
  p.layout = is_neox ? Layout::kNeox : Layout::kGptj;
}

// Checks every argument of op rope / rope_out and fills the argument block.
// Outputs: any strides with stride 1 on head_dim; q_normal may be q and
// k_normal may be k (in place: same storage offset and strides).
inline RopeParams make_rope_params(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& positions, const at::Tensor& inv_freq,
                                   const at::Tensor& pair_scale,
                                   const std::optional<at::Tensor>& mask, int64_t window,
                                   int64_t rotary_dim, bool is_neox, const at::Tensor& q_normal,
                                   const at::Tensor& k_normal, const at::Tensor& q_scaled,
                                   const at::Tensor& k_scaled) {
  // q: [T, H_q, D] or [B, S, H_q, D]; k: same leading shape with H_k heads
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, "q must be [T, H_q, D] or [B, S, H_q, D], got ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim(), "k must have the rank of q (", q.dim(), "), got ", k.sizes());
  const DType dtype = to_dtype(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  const bool packed = q.dim() == 3;
  const int64_t B = packed ? 1 : q.size(0);
  const int64_t S = packed ? q.size(0) : q.size(1);
  const int64_t Hq = q.size(-2), Hk = k.size(-2), D = q.size(-1);
  for (int64_t d = 0; d < q.dim() - 2; ++d) {
    TORCH_CHECK_VALUE(k.size(d) == q.size(d), "k must have the token dims of q, got ", k.sizes(),
                      " for q ", q.sizes());
  }
  TORCH_CHECK_VALUE(k.size(-1) == D, "k must have the head_dim of q (", D, "), got ", k.size(-1));
  TORCH_CHECK_VALUE(Hk > 0 && Hq % Hk == 0, "the number of q heads (", Hq,
                    ") must be a multiple of the number of k heads (", Hk, ")");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_same_device(k, q, "k");
  const int64_t Hm = check_rope_config(q, Hq, Hk, inv_freq, pair_scale, mask, window, rotary_dim);
  // positions: [T] for packed q, [B, S] or [1, S] for batched q
  const IndexType pos_type = to_index_type(positions, "positions");
  check_same_device(positions, q, "positions");
  int64_t pos_sb = 0, pos_ss = 0;
  if (packed) {
    TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == S, "positions must be [T] = [", S,
                      "], got ", positions.sizes());
    pos_ss = positions.stride(0);
  } else {
    TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(1) == S &&
                          (positions.size(0) == B || positions.size(0) == 1),
                      "positions must be [B, S] = [", B, ", ", S, "] or [1, ", S, "], got ",
                      positions.sizes());
    pos_sb = positions.size(0) == 1 ? 0 : positions.stride(0);
    pos_ss = positions.stride(1);
  }
  const int64_t Hks = Hm > 0 ? Hm : Hk;

  const char* names[4] = {"q_normal", "k_normal", "q_scaled", "k_scaled"};
  const at::Tensor* outs[4] = {&q_normal, &k_normal, &q_scaled, &k_scaled};
  const int64_t heads[4] = {Hq, Hk, Hq, Hks};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& o = *outs[i];
    const std::vector<int64_t> shape = rope_output_shape(q, heads[i]);
    TORCH_CHECK_VALUE(o.sizes() == at::IntArrayRef(shape), names[i], " must have shape ",
                      at::IntArrayRef(shape), ", got ", o.sizes());
    TORCH_CHECK_TYPE(o.scalar_type() == q.scalar_type(), names[i], " must have the dtype of q (",
                     q.scalar_type(), "), got ", o.scalar_type());
    check_same_device(o, q, names[i]);
    check_last_dim_contiguous(o, names[i]);
  }

  RopeParams p;
  fill_shared(p, q, k, positions, inv_freq, pair_scale, mask, Hm, q_normal, q_scaled, rotary_dim, window,
              is_neox, dtype, pos_type);
  p.q_strides = row_strides(q);
  p.k_strides = row_strides(k);
  p.pos_stride_batch = pos_sb;
  p.pos_stride_token = pos_ss;
  p.q_normal_strides = row_strides(q_normal);
  p.k_normal = k_normal.data_ptr();
  p.k_normal_strides = row_strides(k_normal);
  p.q_scaled_strides = row_strides(q_scaled);
  p.k_scaled = k_scaled.data_ptr();
  p.k_scaled_strides = row_strides(k_scaled);
  p.batch = B;
  p.seqlen = S;
  return p;
}

inline TokenStrides token_strides(const at::Tensor& t) { return TokenStrides{t.stride(0), t.stride(1)}; }
inline CacheStrides cache_strides(const at::Tensor& t) {
  return CacheStrides{t.stride(0), t.stride(1), t.stride(2)};
}

// Checks every argument of op rope_and_cache and fills the argument block.
inline RopeCacheParams make_rope_cache_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
    const at::Tensor& inv_freq, const at::Tensor& pair_scale, const std::optional<at::Tensor>& mask,
    int64_t window, int64_t rotary_dim, bool is_neox, const at::Tensor& slot_mapping,
    const at::Tensor& k_cache, const at::Tensor& ks_cache, const at::Tensor& v_cache,
    const at::Tensor& q_normal, const at::Tensor& q_scaled) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [T, H_q, D], got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
                    "k must be [T, H_k, D] with T and D of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 3 && v.size(0) == q.size(0) && v.size(1) == k.size(1),
                    "v must be [T, H_k, D_v] with T of q and H_k of k, got ", v.sizes());
  const DType dtype = to_dtype(q, "q");
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), Dv = v.size(2);
  TORCH_CHECK_VALUE(Hk > 0 && Hq % Hk == 0, "the number of q heads (", Hq,
                    ") must be a multiple of the number of k heads (", Hk, ")");
  const int64_t Hm = check_rope_config(q, Hq, Hk, inv_freq, pair_scale, mask, window, rotary_dim);
  const int64_t Hks = Hm > 0 ? Hm : Hk;
  const IndexType pos_type = to_index_type(positions, "positions");
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == T, "positions must be [T] = [", T,
                    "], got ", positions.sizes());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == T,
                    "slot_mapping must be [T] = [", T, "], got ", slot_mapping.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(2) == Hk && k_cache.size(3) == D,
                    "k_cache must be [num_blocks, block_size, H_k=", Hk, ", D=", D, "], got ",
                    k_cache.sizes());
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1);
  TORCH_CHECK_VALUE(ks_cache.dim() == 4 && ks_cache.size(0) == NB && ks_cache.size(1) == BS &&
                        ks_cache.size(2) == Hks && ks_cache.size(3) == D,
                    "ks_cache must be [num_blocks=", NB, ", block_size=", BS, ", H_ks=", Hks, ", D=", D,
                    "] (H_ks: the mask's heads, else H_k), got ", ks_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.dim() == 4 && v_cache.size(0) == NB && v_cache.size(1) == BS &&
                        v_cache.size(2) == Hk && v_cache.size(3) == Dv,
                    "v_cache must be [num_blocks=", NB, ", block_size=", BS, ", H_k=", Hk, ", D_v=", Dv,
                    "], got ", v_cache.sizes());
  for (const at::Tensor* o : {&q_normal, &q_scaled}) {
    const char* name = o == &q_normal ? "q_normal" : "q_scaled";
    TORCH_CHECK_VALUE(o->sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ",
                      o->sizes());
  }
  struct Named {
    const at::Tensor* t;
    const char* name;
  };
  const Named data[] = {{&k, "k"},           {&v, "v"},           {&k_cache, "k_cache"},
                        {&ks_cache, "ks_cache"}, {&v_cache, "v_cache"}, {&q_normal, "q_normal"},
                        {&q_scaled, "q_scaled"}};
  check_last_dim_contiguous(q, "q");
  for (const Named& n : data) {
    TORCH_CHECK_TYPE(n.t->scalar_type() == q.scalar_type(), n.name, " must have the dtype of q (",
                     q.scalar_type(), "), got ", n.t->scalar_type());
    check_same_device(*n.t, q, n.name);
    check_last_dim_contiguous(*n.t, n.name);
  }
  check_same_device(positions, q, "positions");
  check_same_device(slot_mapping, q, "slot_mapping");

  RopeCacheParams p;
  fill_shared(p, q, k, positions, inv_freq, pair_scale, mask, Hm, q_normal, q_scaled, rotary_dim, window,
              is_neox, dtype, pos_type);
  p.q_strides = token_strides(q);
  p.k_strides = token_strides(k);
  p.v = v.data_ptr();
  p.v_strides = token_strides(v);
  p.pos_stride = positions.stride(0);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.slot_stride = slot_mapping.stride(0);
  p.q_normal_strides = token_strides(q_normal);
  p.q_scaled_strides = token_strides(q_scaled);
  p.k_cache = k_cache.data_ptr();
  p.k_cache_strides = cache_strides(k_cache);
  p.ks_cache = ks_cache.data_ptr();
  p.ks_cache_strides = cache_strides(ks_cache);
  p.v_cache = v_cache.data_ptr();
  p.v_cache_strides = cache_strides(v_cache);
  p.num_tokens = T;
  p.v_head_dim = Dv;
  p.num_blocks = NB;
  p.block_size = BS;
  return p;
}

}  // namespace dpe
