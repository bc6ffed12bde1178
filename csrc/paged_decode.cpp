// CPU implementations of the dpe_kernels ops paged_decode and
// paged_decode_rotary (torch launchers)
//
// torch.ops.dpe_kernels.paged_decode(q_normal, q_scaled, k_cache, ks_cache,
//     v_cache, block_table, seq_lens, window, scale, max_seqlen_k)
//   -> (out [B, H_q, Dv] float32, lse [B, H_q] float32)
//
// DPE decode attention (one query per sequence) over paged caches
// [num_blocks, block_size, H, D] of any strides (stride 1 on head_dim),
// read in place through the block table. The schema and fake live in
// dpe_kernels/ops.py; the kernel is csrc/include/dpe/paged_decode_cpu.h
// (torch-free). The Python caller (dpe_kernels/backends/paged_cpu.py)
// validates first; these checks are the same contract for direct callers.
//
// torch.ops.dpe_kernels.paged_decode_rotary(q, k_cache, v_cache, block_table,
//     seq_lens, cos_sin, pair_scale, window, seq_config, mask, rotary_dim,
//     is_neox, scale, max_seqlen_k) -> (out [B, H_q, Dv] float32, lse [B, H_q] float32)
//
// The same decode over a cache of UNROTATED keys, rotated as they are read
// from the float32 table cos_sin [N, rotary_dim], one DPE configuration per
// sequence (seq_config[b] indexes pair_scale [C, P], window [C] and the
// per-query-head mask [C, H_q, P]); kernel csrc/include/dpe/paged_decode_rotary_cpu.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <utility>
#include <cstdint>
#include <tuple>

#include "dpe/paged_decode_cpu.h"
#include "dpe/paged_decode_rotary_cpu.h"
#include "rope_launch.h"

namespace dpe {

namespace {

void check_rows(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.size(-1) == 0 || t.stride(-1) == 1, name, " must have stride 1 on its last dim");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> paged_decode_cpu_op(
    const at::Tensor& q_normal, const at::Tensor& q_scaled, const at::Tensor& k_cache,
    const at::Tensor& ks_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, int64_t window, double scale, int64_t max_seqlen_k) {
  const char* op = "dpe_kernels::paged_decode";
  check_rows(q_normal, 3, "q_normal");
  check_rows(q_scaled, 3, "q_scaled");
  check_rows(k_cache, 4, "k_cache");
  check_rows(ks_cache, 4, "ks_cache");
  check_rows(v_cache, 4, "v_cache");
  TORCH_CHECK_VALUE(q_scaled.sizes() == q_normal.sizes(), "q_scaled must have the shape of q_normal ",
                    q_normal.sizes(), ", got ", q_scaled.sizes());
  const DType dt = to_dtype(q_normal, "q_normal");
  for (const at::Tensor* t : {&q_scaled, &k_cache, &ks_cache, &v_cache})
    TORCH_CHECK_TYPE(t->scalar_type() == q_normal.scalar_type(), "q_scaled, k_cache, ks_cache and v_cache must "
                     "have the dtype of q_normal (", q_normal.scalar_type(), "), got ", t->scalar_type());
  const int64_t B = q_normal.size(0), Hq = q_normal.size(1), D = q_normal.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hk = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache head_dim must be ", D, ", got ", k_cache.sizes());
  TORCH_CHECK_VALUE(ks_cache.size(0) == nb && ks_cache.size(1) == bs && ks_cache.size(3) == D,
                    "ks_cache must be [", nb, ", ", bs, ", H_ks, ", D, "], got ", ks_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.size(0) == nb && v_cache.size(1) == bs && v_cache.size(2) == Hk,
                    "v_cache must be [", nb, ", ", bs, ", ", Hk, ", Dv], got ", v_cache.sizes());
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == B && block_table.device().is_cpu(),
                    "block_table must be a CPU [", B, ", max_blocks] tensor, got ", block_table.sizes());
  TORCH_CHECK_VALUE(block_table.size(1) <= 1 || block_table.stride(1) == 1,
                    "block_table must have stride 1 on its last dim");
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.device().is_cpu(),
                    "seq_lens must be a CPU [", B, "] tensor, got ", seq_lens.sizes());
  const IndexType it = to_index_type(block_table, "block_table");
  TORCH_CHECK_TYPE(seq_lens.scalar_type() == block_table.scalar_type(),
                   "seq_lens must have the dtype of block_table (", block_table.scalar_type(), "), got ",
                   seq_lens.scalar_type());
  const at::Tensor lens = seq_lens.contiguous();

  at::Tensor out = at::empty({B, Hq, v_cache.size(3)}, q_normal.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, Hq}, q_normal.options().dtype(at::kFloat));
  PagedDecodeParams p;
  p.q_normal = q_normal.data_ptr();
  p.qn_strides = QueryStrides{q_normal.stride(0), q_normal.stride(1)};
  p.q_scaled = q_scaled.data_ptr();
  p.qs_strides = QueryStrides{q_scaled.stride(0), q_scaled.stride(1)};
  p.k_cache = k_cache.data_ptr();
  p.k_strides = cache_strides(k_cache);
  p.ks_cache = ks_cache.data_ptr();
  p.ks_strides = cache_strides(ks_cache);
  p.v_cache = v_cache.data_ptr();
  p.v_strides = cache_strides(v_cache);
  p.block_table = block_table.data_ptr();
  p.block_table_stride = block_table.stride(0);
  p.max_blocks = block_table.size(1);
  p.seq_lens = lens.data_ptr();
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.batch = B;
  p.heads_q = Hq;
  p.heads_k = Hk;
  p.heads_ks = ks_cache.size(2);
  p.head_dim = D;
  p.v_head_dim = v_cache.size(3);
  p.num_blocks = nb;
  p.block_size = bs;
  p.window = window;
  p.max_seqlen_k = max_seqlen_k;
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
  p.index_type = it;
  check_status(validate_paged_decode(p), op);
  if (B == 0) return {out, lse};

  // Items (sequence, KV head, key split) over torch's intra-op threads; the
  // plan cuts the context so that there are about 4 items per thread.
  const PagedDecodePlan plan = plan_paged_decode(p, at::get_num_threads());
  at::Tensor partial = at::empty({plan.partial_floats}, q_normal.options().dtype(at::kFloat));
  float* part = partial.data_ptr<float>();
  std::atomic<int> bad{0};
  at::parallel_for(0, plan.items, 1, [&](int64_t begin, int64_t end) {
    paged_decode_range(p, plan, part, begin, end, &bad);
  });
  TORCH_CHECK_VALUE(bad.load() == 0, op, ": block_table / seq_lens: a block id is outside the cache (",
                    nb, " blocks) or a sequence is longer than its block-table row (", p.max_blocks,
                    " blocks of ", bs, ") or than max_seqlen_k (", max_seqlen_k, ")");
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { paged_decode_merge(p, plan, part, begin, end); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> paged_decode_rotary_cpu_op(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& cos_sin, const at::Tensor& pair_scale, const at::Tensor& window,
    const at::Tensor& seq_config, const std::optional<at::Tensor>& mask, int64_t rotary_dim, bool is_neox,
    double scale, int64_t max_seqlen_k) {
  const char* op = "dpe_kernels::paged_decode_rotary";
  check_rows(q, 3, "q");
  check_rows(k_cache, 4, "k_cache");
  check_rows(v_cache, 4, "v_cache");
  const DType dt = to_dtype(q, "q");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "k_cache and v_cache must have the dtype of q (",
                     q.scalar_type(), "), got ", t->scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hk = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache head_dim must be ", D, ", got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.size(0) == nb && v_cache.size(1) == bs && v_cache.size(2) == Hk,
                    "v_cache must be [", nb, ", ", bs, ", ", Hk, ", Dv], got ", v_cache.sizes());
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == B && block_table.device().is_cpu(),
                    "block_table must be a CPU [", B, ", max_blocks] tensor, got ", block_table.sizes());
  TORCH_CHECK_VALUE(block_table.size(1) <= 1 || block_table.stride(1) == 1,
                    "block_table must have stride 1 on its last dim");
  const IndexType it = to_index_type(block_table, "block_table");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&seq_lens, "seq_lens"}, {&seq_config, "seq_config"}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B && t->device().is_cpu(), name, " must be a CPU [", B,
                      "] tensor, got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == block_table.scalar_type(), name, " must have the dtype of block_table (",
                     block_table.scalar_type(), "), got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= D,
                    "rotary_dim must be even and in [2, head_dim=", D, "], got ", rotary_dim);
  const int64_t P = rotary_dim / 2;
  TORCH_CHECK_TYPE(cos_sin.scalar_type() == at::kFloat, "cos_sin must be float32, got ", cos_sin.scalar_type());
  TORCH_CHECK_VALUE(cos_sin.dim() == 2 && cos_sin.size(1) == rotary_dim && cos_sin.device().is_cpu(),
                    "cos_sin must be a CPU [N, rotary_dim=", rotary_dim, "] tensor, got ", cos_sin.sizes());
  TORCH_CHECK_TYPE(pair_scale.scalar_type() == at::kLong && window.scalar_type() == at::kLong,
                   "pair_scale and window must be int64, got ", pair_scale.scalar_type(), " and ", window.scalar_type());
  TORCH_CHECK_VALUE(pair_scale.dim() == 2 && pair_scale.size(1) == P && pair_scale.size(0) >= 1 &&
                        pair_scale.device().is_cpu(),
                    "pair_scale must be a CPU [C, P=", P, "] tensor, got ", pair_scale.sizes());
  const int64_t C = pair_scale.size(0);
  TORCH_CHECK_VALUE(window.dim() == 1 && window.size(0) == C && window.device().is_cpu(),
                    "window must be a CPU [C=", C, "] tensor, got ", window.sizes());
  at::Tensor mask_c;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 3 && mask->size(0) == C && mask->size(1) == Hq && mask->size(2) == P &&
                          mask->device().is_cpu(),
                      "mask must be a CPU [C=", C, ", H_q=", Hq, ", P=", P, "] tensor, got ", mask->sizes());
    mask_c = mask->contiguous();
  }
  const at::Tensor lens = seq_lens.contiguous(), cfg = seq_config.contiguous();
  const at::Tensor table = cos_sin.size(0) > 0 && cos_sin.stride(1) != 1 ? cos_sin.contiguous() : cos_sin;
  const at::Tensor ps = pair_scale.contiguous(), win = window.contiguous();

  at::Tensor out = at::empty({B, Hq, v_cache.size(3)}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  PagedDecodeRotaryParams p;
  p.q = q.data_ptr();
  p.q_strides = QueryStrides{q.stride(0), q.stride(1)};
  p.k_cache = k_cache.data_ptr();
  p.k_strides = cache_strides(k_cache);
  p.v_cache = v_cache.data_ptr();
  p.v_strides = cache_strides(v_cache);
  p.block_table = block_table.data_ptr();
  p.block_table_stride = block_table.stride(0);
  p.max_blocks = block_table.size(1);
  p.seq_lens = lens.data_ptr();
  p.seq_config = cfg.data_ptr();
  p.cos_sin = table.data_ptr<float>();
  p.table_rows = table.size(0);
  p.table_stride = table.size(0) > 0 ? table.stride(0) : rotary_dim;
  p.pair_scale = ps.data_ptr<int64_t>();
  p.window = win.data_ptr<int64_t>();
  p.mask = mask.has_value() ? mask_c.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.batch = B;
  p.heads_q = Hq;
  p.heads_k = Hk;
  p.head_dim = D;
  p.v_head_dim = v_cache.size(3);
  p.rotary_dim = rotary_dim;
  p.num_configs = C;
  p.num_blocks = nb;
  p.block_size = bs;
  p.max_seqlen_k = max_seqlen_k;
  p.is_neox = is_neox;
  p.scale = static_cast<float>(scale);
  p.dtype = dt;
  p.index_type = it;
  check_status(validate_paged_decode_rotary(p), op);
  if (B == 0) return {out, lse};

  const PagedDecodePlan plan = plan_paged_decode_rotary(p, at::get_num_threads());
  at::Tensor partial = at::empty({plan.partial_floats}, q.options().dtype(at::kFloat));
  float* part = partial.data_ptr<float>();
  std::atomic<int> bad{0};
  at::parallel_for(0, plan.items, 1, [&](int64_t begin, int64_t end) {
    paged_decode_rotary_range(p, plan, part, begin, end, &bad);
  });
  TORCH_CHECK_VALUE(bad.load() == 0, op, ": ", rotary_bad_message(bad.load()), " (", nb, " blocks of ", bs,
                    ", block-table rows of ", p.max_blocks, ", max_seqlen_k ", max_seqlen_k, ", ", C,
                    " configurations, ", p.table_rows, " table rows)");
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) { paged_decode_rotary_merge(p, plan, part, begin, end); });
  return {out, lse};
}

}  // namespace dpe

TORCH_LIBRARY_IMPL(dpe_kernels, CPU, m) {
  m.impl("paged_decode", &dpe::paged_decode_cpu_op);
  m.impl("paged_decode_rotary", &dpe::paged_decode_rotary_cpu_op);
}
