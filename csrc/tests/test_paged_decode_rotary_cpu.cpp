// dpe::paged_decode_rotary_cpu (dpe/paged_decode_rotary_cpu.h) against a
// double-precision reference computed here from docs/method.md's index rules:
// random UNROTATED paged caches (one engine buffer seen head-major, as vLLM's
// CPU cache, k | v | pad planes), a float32 cos/sin table, several DPE
// configurations in one batch (windows, scales 1 / 2 / 3 / 4 / 16 in runs,
// sequence b uses configuration b % C), with and without a per-query-head
// mask, neox and gptj pairs, rotary_dim < D, Dv != D, lengths across the
// window edge and 0, float32 / float16 / bfloat16, every compiled CPU body,
// 1 and 2 threads; then the refused values (block ids, configurations, table).
//
// Tolerance (stated once): |out - ref| <= 3e-5 (float32) / 1e-2 (16-bit
// inputs, whose rounding the reference sees too); lse within the same bound.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "dpe/paged_decode_rotary_cpu.h"
#include "paged_test_util.h"

namespace {

using dpe_test::g_checks;
using dpe_test::g_failures;
using dpe_test::Store;

struct Config {
  int64_t window;
  std::vector<int64_t> scales;  // one per pair
};

struct Case {
  int64_t hq, hk, d, dv, rot, bs;
  std::vector<Config> cfgs;
  bool masked, neox;
  std::vector<int32_t> lens;
  dpe::DType dt;
};

// x [D] (double) rotated pair by pair at rows idx[P] of the table.
void rotate_ref(const std::vector<double>& x, const std::vector<int64_t>& idx, const std::vector<float>& tab,
                int64_t P, bool neox, std::vector<double>& y) {
  y = x;
  for (int64_t i = 0; i < P; ++i) {
    const double c = tab[static_cast<size_t>(idx[static_cast<size_t>(i)] * 2 * P + i)];
    const double s = tab[static_cast<size_t>(idx[static_cast<size_t>(i)] * 2 * P + P + i)];
    const int64_t lo = neox ? i : 2 * i, hi = neox ? i + P : 2 * i + 1;
    y[static_cast<size_t>(lo)] = x[static_cast<size_t>(lo)] * c - x[static_cast<size_t>(hi)] * s;
    y[static_cast<size_t>(hi)] = x[static_cast<size_t>(lo)] * s + x[static_cast<size_t>(hi)] * c;
  }
}

void run_case(const Case& c, std::mt19937& g) {
  const int64_t B = static_cast<int64_t>(c.lens.size()), P = c.rot / 2, C = static_cast<int64_t>(c.cfgs.size());
  int64_t max_len = 0, used = 0;
  for (int32_t n : c.lens) {
    max_len = std::max<int64_t>(max_len, n);
    used += (n + c.bs - 1) / c.bs;
  }
  const int64_t nb = used + 3, max_blocks = (max_len + c.bs - 1) / c.bs + 2;
  const int64_t W = c.d + c.dv + 3;  // head-major buffer [nb, hk, bs, W]: k | v | pad
  Store buf(static_cast<size_t>(nb * c.hk * c.bs * W), c.dt, g);
  Store q(static_cast<size_t>(B * c.hq * c.d), c.dt, g);
  std::vector<int32_t> perm(static_cast<size_t>(nb));
  for (int64_t i = 0; i < nb; ++i) perm[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<int32_t> bt(static_cast<size_t>(B * max_blocks), 1 << 30);  // garbage past each sequence
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (c.lens[static_cast<size_t>(b)] + c.bs - 1) / c.bs; ++j)
      bt[static_cast<size_t>(b * max_blocks + j)] = perm[static_cast<size_t>(next++)];
  std::vector<int32_t> seq_cfg(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) seq_cfg[static_cast<size_t>(b)] = static_cast<int32_t>(b % C);
  std::vector<int64_t> pair_scale, window;
  for (const Config& cf : c.cfgs) {
    window.push_back(cf.window);
    pair_scale.insert(pair_scale.end(), cf.scales.begin(), cf.scales.end());
  }
  std::vector<uint8_t> mask_u8(static_cast<size_t>(C * c.hq * P), 1);
  std::bernoulli_distribution coin(0.6);
  if (c.masked)
    for (auto& m : mask_u8) m = coin(g);
  std::vector<bool> kd_ref(mask_u8.begin(), mask_u8.end());
  bool* mask_ptr = reinterpret_cast<bool*>(mask_u8.data());  // 0 / 1 bytes: valid bools
  // Table: cos | sin of float32(t) * inv_freq (a float32 angle), rows 0 .. max_len - 1.
  const int64_t N = std::max<int64_t>(max_len, 1);
  std::vector<float> tab(static_cast<size_t>(N * 2 * P));
  for (int64_t t = 0; t < N; ++t)
    for (int64_t i = 0; i < P; ++i) {
      const float inv = static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(c.rot)));
      const float ang = static_cast<float>(t) * inv;
      tab[static_cast<size_t>(t * 2 * P + i)] = static_cast<float>(std::cos(static_cast<double>(ang)));
      tab[static_cast<size_t>(t * 2 * P + P + i)] = static_cast<float>(std::sin(static_cast<double>(ang)));
    }

  const dpe::CacheStrides hm{c.hk * c.bs * W, W, c.bs * W};
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  const int64_t rep = c.hq / c.hk;

  // reference (double)
  std::vector<double> ref(static_cast<size_t>(B * c.hq * c.dv)), ref_lse(static_cast<size_t>(B * c.hq));
  std::vector<double> x, y, ky;
  std::vector<int64_t> idx(static_cast<size_t>(P));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = c.lens[static_cast<size_t>(b)], cf = seq_cfg[static_cast<size_t>(b)];
    const int64_t w = window[static_cast<size_t>(cf)], m = L - 1;
    const int64_t* s = pair_scale.data() + cf * P;
    for (int64_t h = 0; h < c.hq; ++h) {
      const int64_t hk = h / rep;
      auto kd = [&](int64_t i) { return bool(kd_ref[static_cast<size_t>((cf * c.hq + h) * P + i)]); };
      std::vector<double> qn, qs;
      x.assign(q.f.begin() + (b * c.hq + h) * c.d, q.f.begin() + (b * c.hq + h + 1) * c.d);
      if (L > 0) {
        for (int64_t i = 0; i < P; ++i) idx[static_cast<size_t>(i)] = m;
        rotate_ref(x, idx, tab, P, c.neox, qn);
        for (int64_t i = 0; i < P; ++i)
          idx[static_cast<size_t>(i)] = kd(i) && m >= w ? m / s[i] + (w - w / s[i]) : m;
        rotate_ref(x, idx, tab, P, c.neox, qs);
      }
      std::vector<double> sc(static_cast<size_t>(L));
      double mx = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t phys = bt[static_cast<size_t>(b * max_blocks + t / c.bs)], slot = t % c.bs;
        const size_t k0 = static_cast<size_t>(phys * hm.block + slot * hm.slot + hk * hm.head);
        x.assign(buf.f.begin() + static_cast<std::ptrdiff_t>(k0), buf.f.begin() + static_cast<std::ptrdiff_t>(k0 + c.d));
        const bool win = t >= L - w;
        for (int64_t i = 0; i < P; ++i) idx[static_cast<size_t>(i)] = win || !kd(i) ? t : t / s[i];
        rotate_ref(x, idx, tab, P, c.neox, ky);
        const std::vector<double>& qq = win ? qn : qs;
        double dot = 0;
        for (int64_t i = 0; i < c.d; ++i) dot += qq[static_cast<size_t>(i)] * ky[static_cast<size_t>(i)];
        sc[static_cast<size_t>(t)] = dot * static_cast<double>(scale);
        mx = std::max(mx, sc[static_cast<size_t>(t)]);
      }
      double l = 0;
      std::vector<double> o(static_cast<size_t>(c.dv), 0.0);
      for (int64_t t = 0; t < L; ++t) {
        const double wt = std::exp(sc[static_cast<size_t>(t)] - mx);
        l += wt;
        const int64_t phys = bt[static_cast<size_t>(b * max_blocks + t / c.bs)], slot = t % c.bs;
        for (int64_t i = 0; i < c.dv; ++i)
          o[static_cast<size_t>(i)] += wt * buf.f[static_cast<size_t>(phys * hm.block + slot * hm.slot + hk * hm.head + c.d + i)];
      }
      for (int64_t i = 0; i < c.dv; ++i)
        ref[static_cast<size_t>((b * c.hq + h) * c.dv + i)] = L ? o[static_cast<size_t>(i)] / l : 0.0;
      ref_lse[static_cast<size_t>(b * c.hq + h)] = L ? mx + std::log(l) : -INFINITY;
    }
  }

  dpe::PagedDecodeRotaryParams p;
  p.q = q.ptr();
  p.q_strides = {c.hq * c.d, c.d};
  p.k_cache = buf.ptr();
  p.k_strides = hm;
  p.v_cache = buf.ptr(static_cast<size_t>(c.d));
  p.v_strides = hm;
  p.block_table = bt.data();
  p.block_table_stride = max_blocks;
  p.max_blocks = max_blocks;
  p.seq_lens = c.lens.data();
  p.seq_config = seq_cfg.data();
  p.cos_sin = tab.data();
  p.table_rows = N;
  p.table_stride = 2 * P;
  p.pair_scale = pair_scale.data();
  p.window = window.data();
  p.mask = c.masked ? mask_ptr : nullptr;
  std::vector<float> out(static_cast<size_t>(B * c.hq * c.dv)), lse(static_cast<size_t>(B * c.hq));
  p.out = out.data();
  p.lse = lse.data();
  p.batch = B;
  p.heads_q = c.hq;
  p.heads_k = c.hk;
  p.head_dim = c.d;
  p.v_head_dim = c.dv;
  p.rotary_dim = c.rot;
  p.num_configs = C;
  p.num_blocks = nb;
  p.block_size = c.bs;
  p.max_seqlen_k = max_len;
  p.is_neox = c.neox;
  p.scale = scale;
  p.dtype = c.dt;
  p.index_type = dpe::IndexType::kInt32;
  const double tol = c.dt == dpe::DType::kFloat32 ? 3e-5 : 1e-2;
  for (dpe::CpuIsa isa : {dpe::CpuIsa::kBaseline, dpe::CpuIsa::kAvx2, dpe::CpuIsa::kAvx512}) {
    if (!dpe::cpu_isa_supported(isa)) continue;
    dpe::set_cpu_isa(isa);
    for (int threads : {1, 2}) {
      const std::string tag = "D=" + std::to_string(c.d) + " Dv=" + std::to_string(c.dv) + " R=" +
                              std::to_string(c.rot) + (c.masked ? " masked" : "") + (c.neox ? " neox" : " gptj") +
                              " dtype=" + std::to_string(static_cast<int>(c.dt)) +
                              " isa=" + std::to_string(static_cast<int>(isa)) + " threads=" + std::to_string(threads);
      std::fill(out.begin(), out.end(), 123.0f);
      const dpe::Status st = dpe::paged_decode_rotary_cpu(p, threads);
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

  // refused values (read on the host): each a kInvalidValue, never an out-of-bounds read
  const auto code = [](const dpe::PagedDecodeRotaryParams& r) { return dpe::paged_decode_rotary_cpu(r).code; };
  if (B > 0 && c.lens[0] > 0) {
    std::vector<int32_t> bt2 = bt;
    bt2[0] = static_cast<int32_t>(nb);
    dpe::PagedDecodeRotaryParams r = p;
    r.block_table = bt2.data();
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "block id past the cache accepted");
    bt2[0] = -1;
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "negative block id accepted");
    std::vector<int32_t> lens2 = c.lens;
    lens2[0] = static_cast<int32_t>(max_blocks * c.bs + 1);
    r = p;
    r.seq_lens = lens2.data();
    r.max_seqlen_k = lens2[0];
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "sequence past its row accepted");
    std::vector<int32_t> cfg2 = seq_cfg;
    cfg2[0] = static_cast<int32_t>(C);
    r = p;
    r.seq_config = cfg2.data();
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "seq_config past C accepted");
    std::vector<int64_t> ps2 = pair_scale;
    ps2[static_cast<size_t>(seq_cfg[0] * P + P - 1)] = 0;
    r = p;
    r.pair_scale = ps2.data();
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "pair scale 0 accepted");
    std::vector<int64_t> w2 = window;
    w2[static_cast<size_t>(seq_cfg[0])] = 0;
    r = p;
    r.window = w2.data();
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "window 0 accepted");
    r = p;
    r.table_rows = c.lens[0] - 1;
    CHECK(code(r) == dpe::ErrorCode::kInvalidValue, "a table shorter than a sequence accepted");
  }
  dpe::PagedDecodeRotaryParams r = p;
  r.rotary_dim = c.d + 2;
  CHECK(code(r) == dpe::ErrorCode::kInvalidShape, "rotary_dim > D accepted");
  r = p;
  r.out = nullptr;
  CHECK(B == 0 || code(r) == dpe::ErrorCode::kNullPointer, "null out accepted");
}

std::vector<int64_t> runs(const std::vector<std::pair<int64_t, int64_t>>& rl) {  // (scale, pairs) runs
  std::vector<int64_t> s;
  for (auto [v, n] : rl) s.insert(s.end(), static_cast<size_t>(n), v);
  return s;
}

}  // namespace

int main() {
  std::mt19937 g(20250425);
  const std::vector<int32_t> lens = {1500, 300, 0, 1, 64, 700};
  for (dpe::DType dt : {dpe::DType::kFloat32, dpe::DType::kFloat16, dpe::DType::kBFloat16}) {
    for (bool masked : {false, true}) {
      // D 64 (compiled size), SmolLM2-like groups of 4 pairs, two configurations
      const std::vector<Config> c64 = {{100, runs({{16, 4}, {1, 4}, {8, 8}, {4, 8}, {2, 8}})},
                                       {37, runs({{1, 10}, {3, 12}, {2, 10}})}};
      run_case(Case{6, 2, 64, 64, 64, 16, c64, masked, true, lens, dt}, g);
      run_case(Case{6, 2, 64, 64, 64, 128, c64, masked, false, lens, dt}, g);  // gptj, vLLM CPU's block size
      // D 128, rotary_dim 96 < D (P 48: AVX-512 16 + 16 + 16), one configuration
      const std::vector<Config> c128 = {{300, runs({{1, 8}, {4, 20}, {16, 20}})}};
      run_case(Case{4, 2, 128, 128, 96, 32, c128, masked, true, lens, dt}, g);
      // run-time sizes: D 40, R 24 (P 12: AVX2 8 + scalar 4), Dv 24, MHA, block 24
      const std::vector<Config> c40 = {{50, runs({{2, 5}, {5, 7}})}, {1, runs({{1, 12}})}, {2000, runs({{4, 12}})}};
      run_case(Case{4, 4, 40, 24, 24, 24, c40, masked, true, lens, dt}, g);
    }
  }
  std::printf("test_paged_decode_rotary_cpu: %d checks, %d failed (cpu isa: %d)\n", g_checks, g_failures,
              static_cast<int>(dpe::active_cpu_isa()));
  return g_failures == 0 ? 0 : 1;
}
