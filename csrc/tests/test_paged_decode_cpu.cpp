// dpe::paged_decode_cpu (dpe/paged_decode_cpu.h) against a double-precision
// reference computed here: random paged caches (one engine buffer seen
// head-major, as vLLM's CPU cache, with k_normal | k_scaled | v planes),
// shuffled block tables, lengths across the window edge and 0, GQA with scaled
// keys per KV head and per query head, D = Dv in {64, 128} (the compiled-size
// bodies) and D = 40, Dv = 24 (run-time sizes), float32 / float16 / bfloat16,
// every compiled CPU body, 1 and 2 threads; then the errors.
//
// Tolerance (stated once): |out - ref| <= 2e-5 (float32) / 1e-2 (16-bit
// inputs, whose rounding the reference sees too: it reads the stored values);
// lse within the same bound.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dpe/paged_decode_cpu.h"
#include "paged_test_util.h"

namespace {

using dpe_test::Store;
using dpe_test::g_checks;
using dpe_test::g_failures;

struct Case {
  int64_t hq, hk, hks, d, dv, bs, window;
  std::vector<int32_t> lens;
  dpe::DType dt;
};

void run_case(const Case& c, std::mt19937& g) {
  const int64_t B = static_cast<int64_t>(c.lens.size());
  int64_t max_len = 0, used = 0;
  for (int32_t n : c.lens) {
    max_len = std::max<int64_t>(max_len, n);
    used += (n + c.bs - 1) / c.bs;
  }
  const int64_t nb = used + 3, max_blocks = (max_len + c.bs - 1) / c.bs + 2;
  // One buffer [nb, heads, bs, W] (head-major); W holds k | ks | v | pad. With
  // per-query-head scaled keys the ks heads live in a second buffer.
  const int64_t W = 2 * c.d + c.dv + 5;
  Store buf(static_cast<size_t>(nb * c.hk * c.bs * W), c.dt, g);
  Store ksb(static_cast<size_t>(nb * c.hks * c.bs * c.d), c.dt, g);
  Store qn(static_cast<size_t>(B * c.hq * c.d), c.dt, g), qs(static_cast<size_t>(B * c.hq * c.d), c.dt, g);
  std::vector<int32_t> perm(static_cast<size_t>(nb));
  for (int64_t i = 0; i < nb; ++i) perm[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<int32_t> bt(static_cast<size_t>(B * max_blocks), 1 << 30);  // garbage past each sequence
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (c.lens[static_cast<size_t>(b)] + c.bs - 1) / c.bs; ++j)
      bt[static_cast<size_t>(b * max_blocks + j)] = perm[static_cast<size_t>(next++)];

  const dpe::CacheStrides hm{c.hk * c.bs * W, W, c.bs * W};
  const bool per_q = c.hks != c.hk;
  const dpe::CacheStrides ks_str = per_q ? dpe::CacheStrides{c.hks * c.bs * c.d, c.d, c.bs * c.d} : hm;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  const int64_t rep = c.hq / c.hk;

  // reference (double)
  std::vector<double> ref(static_cast<size_t>(B * c.hq * c.dv)), ref_lse(static_cast<size_t>(B * c.hq));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = c.lens[static_cast<size_t>(b)];
    for (int64_t h = 0; h < c.hq; ++h) {
      const int64_t hk = h / rep;
      std::vector<double> sc(static_cast<size_t>(L));
      double m = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t phys = bt[static_cast<size_t>(b * max_blocks + t / c.bs)], slot = t % c.bs;
        const bool win = t >= L - c.window;
        double s = 0;
        for (int64_t i = 0; i < c.d; ++i) {
          const double qv = (win ? qn : qs).f[static_cast<size_t>((b * c.hq + h) * c.d + i)];
          double kv;
          if (win) kv = buf.f[static_cast<size_t>(phys * hm.block + slot * hm.slot + hk * hm.head + i)];
          else if (per_q) kv = ksb.f[static_cast<size_t>(phys * ks_str.block + slot * ks_str.slot + h * ks_str.head + i)];
          else kv = buf.f[static_cast<size_t>(phys * hm.block + slot * hm.slot + hk * hm.head + c.d + i)];
          s += qv * kv;
        }
        sc[static_cast<size_t>(t)] = s * static_cast<double>(scale);
        m = std::max(m, sc[static_cast<size_t>(t)]);
      }
      double l = 0;
      std::vector<double> o(static_cast<size_t>(c.dv), 0.0);
      for (int64_t t = 0; t < L; ++t) {
        const double w = std::exp(sc[static_cast<size_t>(t)] - m);
        l += w;
        const int64_t phys = bt[static_cast<size_t>(b * max_blocks + t / c.bs)], slot = t % c.bs;
        for (int64_t i = 0; i < c.dv; ++i)
          o[static_cast<size_t>(i)] += w * buf.f[static_cast<size_t>(phys * hm.block + slot * hm.slot + hk * hm.head + 2 * c.d + i)];
      }
      for (int64_t i = 0; i < c.dv; ++i)
        ref[static_cast<size_t>((b * c.hq + h) * c.dv + i)] = L ? o[static_cast<size_t>(i)] / l : 0.0;
      ref_lse[static_cast<size_t>(b * c.hq + h)] = L ? m + std::log(l) : -INFINITY;
    }
  }

  dpe::PagedDecodeParams p;
  p.q_normal = qn.ptr();
  p.qn_strides = {c.hq * c.d, c.d};
  p.q_scaled = qs.ptr();
  p.qs_strides = {c.hq * c.d, c.d};
  p.k_cache = buf.ptr();
  p.k_strides = hm;
  p.ks_cache = per_q ? ksb.ptr() : buf.ptr(static_cast<size_t>(c.d));
  p.ks_strides = ks_str;
  p.v_cache = buf.ptr(static_cast<size_t>(2 * c.d));
  p.v_strides = hm;
  p.block_table = bt.data();
  p.block_table_stride = max_blocks;
  p.max_blocks = max_blocks;
  p.seq_lens = c.lens.data();
  std::vector<float> out(static_cast<size_t>(B * c.hq * c.dv)), lse(static_cast<size_t>(B * c.hq));
  p.out = out.data();
  p.lse = lse.data();
  p.batch = B;
  p.heads_q = c.hq;
  p.heads_k = c.hk;
  p.heads_ks = c.hks;
  p.head_dim = c.d;
  p.v_head_dim = c.dv;
  p.num_blocks = nb;
  p.block_size = c.bs;
  p.window = c.window;
  p.max_seqlen_k = max_len;
  p.scale = scale;
  p.dtype = c.dt;
  p.index_type = dpe::IndexType::kInt32;
  const double tol = c.dt == dpe::DType::kFloat32 ? 2e-5 : 1e-2;
  for (dpe::CpuIsa isa : {dpe::CpuIsa::kBaseline, dpe::CpuIsa::kAvx2, dpe::CpuIsa::kAvx512}) {
    if (!dpe::cpu_isa_supported(isa)) continue;
    dpe::set_cpu_isa(isa);
    for (int threads : {1, 2}) {
      const std::string tag = "D=" + std::to_string(c.d) + " Dv=" + std::to_string(c.dv) + " hks=" +
                              std::to_string(c.hks) + " dtype=" + std::to_string(static_cast<int>(c.dt)) +
                              " isa=" + std::to_string(static_cast<int>(isa)) + " threads=" + std::to_string(threads);
      std::fill(out.begin(), out.end(), 123.0f);
      const dpe::Status st = dpe::paged_decode_cpu(p, threads);
      CHECK(st.ok(), "%s: %s", tag.c_str(), st.message);
      double err = 0, lerr = 0;
      int bad_empty = 0;
      for (size_t i = 0; i < out.size(); ++i) err = std::max(err, std::fabs(out[i] - ref[i]));
      for (size_t i = 0; i < lse.size(); ++i) {
        if (std::isinf(ref_lse[i])) bad_empty += !(std::isinf(lse[i]) && lse[i] < 0);
        else lerr = std::max(lerr, std::fabs(lse[i] - ref_lse[i]));
      }
      CHECK(err <= tol, "%s: out max error %.3g > %.3g", tag.c_str(), err, tol);
      CHECK(lerr <= tol, "%s: lse max error %.3g > %.3g", tag.c_str(), lerr, tol);
      CHECK(bad_empty == 0, "%s: %d rows without keys are not lse -inf", tag.c_str(), bad_empty);
    }
  }
  dpe::set_cpu_isa(dpe::CpuIsa::kAuto);

  // errors: a block id outside the cache, a sequence longer than its row, bad sizes
  if (B > 0 && c.lens[0] > 0) {
    std::vector<int32_t> bt2 = bt;
    bt2[0] = static_cast<int32_t>(nb);
    dpe::PagedDecodeParams q = p;
    q.block_table = bt2.data();
    CHECK(dpe::paged_decode_cpu(q).code == dpe::ErrorCode::kInvalidValue, "block id past the cache accepted");
    std::vector<int32_t> lens2 = c.lens;
    lens2[0] = static_cast<int32_t>(max_blocks * c.bs + 1);
    q = p;
    q.seq_lens = lens2.data();
    q.max_seqlen_k = lens2[0];
    CHECK(dpe::paged_decode_cpu(q).code == dpe::ErrorCode::kInvalidValue, "sequence past its row accepted");
  }
  dpe::PagedDecodeParams q = p;
  q.window = 0;
  CHECK(dpe::paged_decode_cpu(q).code == dpe::ErrorCode::kInvalidWindow, "window 0 accepted");
  q = p;
  q.heads_ks = c.hk + 1;
  CHECK(dpe::paged_decode_cpu(q).code == dpe::ErrorCode::kInvalidHeads, "heads_ks mismatch accepted");
  q = p;
  q.out = nullptr;
  CHECK(B == 0 || dpe::paged_decode_cpu(q).code == dpe::ErrorCode::kNullPointer, "null out accepted");
}

}  // namespace

int main() {
  std::mt19937 g(20250425);
  const std::vector<int32_t> lens = {1500, 300, 0, 1, 64};
  for (dpe::DType dt : {dpe::DType::kFloat32, dpe::DType::kFloat16, dpe::DType::kBFloat16}) {
    for (int64_t d : {64, 128}) {
      run_case(Case{6, 2, 2, d, d, 16, 100, lens, dt}, g);   // scaled keys per KV head
      run_case(Case{6, 2, 6, d, d, 128, 300, lens, dt}, g);  // per query head, vLLM CPU's block size
    }
    run_case(Case{4, 4, 4, 40, 24, 24, 50, lens, dt}, g);    // run-time sizes, MHA, block 24
  }
  std::printf("test_paged_decode_cpu: %d checks, %d failed (cpu isa: %d)\n", g_checks, g_failures,
              static_cast<int>(dpe::active_cpu_isa()));
  return g_failures == 0 ? 0 : 1;
}
