// How close the in-place DPE rotary step is to its memory-traffic floor on
// this CPU. One process, interleaved repeats, medians; prints a markdown table.
//
//   cmake -S csrc -B build && cmake --build build --target bench_rope_traffic
//   build/bench_rope_traffic [--tokens T] [--threads N] [--repeats R]
//
// Rows (T tokens, 32 query / 8 KV heads, D = 128, rotate_half, float32 and
// bfloat16), every one over the same q / k buffers:
//   * plain traffic: each 64-byte line of q and k loaded and stored back in
//     place, no arithmetic: the bytes an in-place plain rotary must move
//     (what vLLM's rotary_embedding does), at this machine's best;
//   * DPE traffic: the same plus a streaming (non-temporal) store of each line
//     to a second buffer: the bytes the in-place DPE step must move (q, k in
//     place plus q_scaled, k_scaled), at this machine's best;
//   * dpe::rope_cpu in place (q_normal = q, k_normal = k, scaled outputs
//     fresh), the library's kernel.
// The ratio DPE traffic / plain traffic is the floor of "in-place DPE rope
// time / plain rotary time" on this machine: no kernel doing DPE's job can go
// below it, whatever its arithmetic.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "dpe/rope_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DPE_BENCH_TARGET __attribute__((target("avx512f")))
#else
#define DPE_BENCH_TARGET
#endif

namespace {

// Lines [begin, end) of buf: load, add `zero` (a run-time 0, so the compiler
// cannot drop the store of an unchanged value), store back; with `copy`, also
// stream each line to copy (both 64-byte aligned).
DPE_BENCH_TARGET void touch_lines(char* buf, char* copy, int64_t begin, int64_t end, float zero) {
#if defined(__x86_64__) && defined(__GNUC__)
  const __m512 z = _mm512_set1_ps(zero);
  for (int64_t i = begin; i < end; ++i) {
    const __m512 v = _mm512_add_ps(_mm512_load_ps(reinterpret_cast<float*>(buf + 64 * i)), z);
    _mm512_store_ps(reinterpret_cast<float*>(buf + 64 * i), v);
    if (copy != nullptr) _mm512_stream_ps(reinterpret_cast<float*>(copy + 64 * i), v);
  }
  if (copy != nullptr) _mm_sfence();
#else
  (void)zero;
  for (int64_t i = begin; i < end; ++i) {
    std::memmove(buf + 64 * i, buf + 64 * i, 64);
    if (copy != nullptr) std::memcpy(copy + 64 * i, buf + 64 * i, 64);
  }
#endif
}

char* alloc_lines(size_t bytes) {
  char* p = static_cast<char*>(::operator new(bytes, std::align_val_t{64}));
  std::memset(p, 0, bytes);  // first touch outside the timings
  return p;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t T = 16384;
  int threads = 2, repeats = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long v = std::strtol(argv[i + 1], nullptr, 10);
    if (a == "--tokens" && v > 0) T = v;
    else if (a == "--threads" && v > 0) threads = static_cast<int>(v);
    else if (a == "--repeats" && v > 0) repeats = static_cast<int>(v);
    else {
      std::fprintf(stderr, "usage: %s [--tokens T>0] [--threads N>0] [--repeats R>0]\n", argv[0]);
      return 2;
    }
  }
  if (argc % 2 == 0) {
    std::fprintf(stderr, "usage: %s [--tokens T>0] [--threads N>0] [--repeats R>0]\n", argv[0]);
    return 2;
  }
  const int64_t Hq = 32, Hk = 8, D = 128, P = D / 2;
  const float zero = static_cast<float>(argc) * 0.0f;  // 0, unknown to the compiler
  std::printf("| dtype | threads | plain traffic (ms) | DPE traffic (ms) | dpe::rope_cpu in place (ms) "
              "| floor: DPE / plain traffic | rope_cpu / plain traffic | rope_cpu / DPE traffic |\n"
              "|---|---|---|---|---|---|---|---|\n");
  for (dpe::DType dt : {dpe::DType::kBFloat16, dpe::DType::kFloat32}) {
    const size_t es = dt == dpe::DType::kFloat32 ? 4 : 2;
    const size_t qb = static_cast<size_t>(T * Hq * D) * es, kb = static_cast<size_t>(T * Hk * D) * es;
    char *q = alloc_lines(qb), *k = alloc_lines(kb), *qs = alloc_lines(qb), *ks = alloc_lines(kb);
    for (size_t i = 0; i < qb / es; ++i) {  // finite values: 0.5 .. 1.5 (float32) / their bf16
      const float f = 0.5f + static_cast<float>(i % 97) / 97.0f;
      if (es == 4) std::memcpy(q + 4 * i, &f, 4);
      else { uint32_t u; std::memcpy(&u, &f, 4); const uint16_t h = static_cast<uint16_t>(u >> 16); std::memcpy(q + 2 * i, &h, 2); }
    }
    std::memcpy(k, q, kb);
    std::vector<int64_t> pos(static_cast<size_t>(T)), scale(static_cast<size_t>(P));
    std::vector<float> inv(static_cast<size_t>(P));
    const int64_t group_scale[8] = {4, 4, 2, 16, 32, 32, 16, 128};
    for (int64_t i = 0; i < T; ++i) pos[static_cast<size_t>(i)] = i;
    for (int64_t i = 0; i < P; ++i) {
      inv[static_cast<size_t>(i)] = static_cast<float>(std::pow(500000.0, -2.0 * static_cast<double>(i) / D));
      scale[static_cast<size_t>(i)] = group_scale[i / 8];
    }
    dpe::RopeParams p;
    p.q = q; p.k = k; p.q_normal = q; p.k_normal = k; p.q_scaled = qs; p.k_scaled = ks;
    const dpe::RowStrides rq{T * Hq * D, Hq * D, D}, rk{T * Hk * D, Hk * D, D};
    p.q_strides = p.q_normal_strides = p.q_scaled_strides = rq;
    p.k_strides = p.k_normal_strides = p.k_scaled_strides = rk;
    p.positions = pos.data(); p.inv_freq = inv.data(); p.pair_scale = scale.data();
    p.batch = 1; p.seqlen = T; p.heads_q = Hq; p.heads_k = Hk; p.head_dim = D; p.rotary_dim = D;
    p.window = 1024; p.dtype = dt;
    std::vector<double> t_plain, t_dpe_traffic, t_rope;
    auto traffic = [&](bool with_copy) {
      dpe::parallel_tokens(static_cast<int64_t>(qb / 64), threads, [&](int64_t b, int64_t e) {
        touch_lines(q, with_copy ? qs : nullptr, b, e, zero);
      });
      dpe::parallel_tokens(static_cast<int64_t>(kb / 64), threads, [&](int64_t b, int64_t e) {
        touch_lines(k, with_copy ? ks : nullptr, b, e, zero);
      });
    };
    for (int r = 0; r < repeats + 1; ++r) {  // the first round warms up, not counted
      double t0 = now();
      traffic(false);
      double t1 = now();
      traffic(true);
      double t2 = now();
      const dpe::Status st = dpe::rope_cpu(p, threads);
      double t3 = now();
      if (!st.ok()) {
        std::fprintf(stderr, "rope_cpu: %s\n", st.message);
        return 1;
      }
      if (r == 0) continue;
      t_plain.push_back(t1 - t0);
      t_dpe_traffic.push_back(t2 - t1);
      t_rope.push_back(t3 - t2);
    }
    const double a = median(t_plain), b = median(t_dpe_traffic), c = median(t_rope);
    std::printf("| %s | %d | %.2f | %.2f | %.2f | %.2fx | %.2fx | %.2fx |\n",
                dt == dpe::DType::kFloat32 ? "float32" : "bfloat16", threads, a * 1e3, b * 1e3, c * 1e3, b / a,
                c / a, c / b);
    for (char* ptr : {q, k, qs, ks}) ::operator delete(ptr, std::align_val_t{64});
  }
  std::printf("\nT = %lld tokens, 32/8 heads, D = 128, medians of %d interleaved repeats; cpu isa body %d.\n",
              static_cast<long long>(T), repeats, static_cast<int>(dpe::active_cpu_isa()));
  return 0;
}
