// Test of the torch-free CPU entry points (dpe/rope_cpu.h) against values
// this file computes itself in double precision.
//
// Covered: rope_cpu and rope_and_cache_cpu; neox and gptj; GQA (H_q = 4 H_k);
// no mask, per-query-head mask, per-KV-head mask; partial rotary; positions
// up to 3e8 (past 2^20, and past the 2^28-radian fast sin/cos range);
// int32 and int64 positions; float32 / float16 / bfloat16; non-contiguous
// input strides (q, k, v views of one packed qkv row) and output strides
// (views into larger buffers whose other elements must stay untouched);
// in place (q_normal is q, k_normal is k: bitwise equal to out of place);
// paged caches with a head-major layout and negative (skipped) slots; every
// compiled body (baseline, AVX2, AVX-512 where the CPU has them); 1 thread
// vs the OpenMP default (bitwise equal); argument validation (each error
// code names its argument, nothing is written); the float16 / bfloat16
// storage conversions.
//
// Tolerances, |got - ref| <= atol + rtol * |ref| with inputs in [-1, 1]
// (the kernel computes in float32 and rounds once to the storage type):
//   float32   atol 1e-5, rtol 1e-5   (float32 arithmetic, ~1e-7)
//   float16   atol 1e-5, rtol 1e-3   (rounding: 2^-11 relative)
//   bfloat16  atol 1e-5, rtol 8e-3   (rounding: 2^-8 relative)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "dpe/rope_cpu.h"

namespace {

using dpe::DType;
using dpe::ErrorCode;
using dpe::IndexType;
using dpe::Layout;

int g_checks = 0;
int g_failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++g_checks;                                            \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      if (g_failures <= 40) {                              \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
    }                                                      \
  } while (0)

// ---------------------------------------------------------------------------
// Deterministic random numbers (splitmix64).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }  // [0, 1)
  double symmetric() { return 2.0 * uniform() - 1.0; }                       // [-1, 1)
};

// ---------------------------------------------------------------------------
// Storage decode written here from the formats' definitions (independent of
// the header); encode uses the header's conversions (any encoding will do:
// the reference reads the stored bits back).
double decode_half(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int e = (h >> 10) & 0x1F;
  const int f = h & 0x3FF;
  if (e == 0x1F) return f ? NAN : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(static_cast<double>(f), -24);
  return sign * std::ldexp(1.0 + f / 1024.0, e - 15);
}

double decode_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

size_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// 64-byte aligned storage (a cache line: the streaming stores' alignment), so
// that views at aligned offsets take the kernel's streaming path.
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t{64}); }
  template <class U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

// A flat buffer of one dtype, addressed by element index.
struct Buf {
  DType dt;
  std::vector<uint8_t, LineAligned<uint8_t>> bytes;
  Buf(DType d, int64_t n, uint8_t fill = 0x7E) : dt(d), bytes(static_cast<size_t>(n) * elem_size(d), fill) {}
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  int64_t size() const { return static_cast<int64_t>(bytes.size() / elem_size(dt)); }
  double get(int64_t i) const {
    if (dt == DType::kFloat32) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      return f;
    }
    uint16_t u;
    std::memcpy(&u, bytes.data() + 2 * i, 2);
    return dt == DType::kFloat16 ? decode_half(u) : decode_bf16(u);
  }
  void set(int64_t i, double v) {
    const float f = static_cast<float>(v);
    if (dt == DType::kFloat32) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    } else if (dt == DType::kFloat16) {
      const dpe::CpuScalar<DType::kFloat16>::type h(f);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    } else {
      const dpe::bf16_storage h(f);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  bool same_bits(int64_t i, const Buf& o, int64_t j) const {
    const size_t es = elem_size(dt);
    return std::memcmp(bytes.data() + es * i, o.bytes.data() + es * j, es) == 0;
  }
  bool is_sentinel(int64_t i) const {
    const size_t es = elem_size(dt);
    for (size_t b = 0; b < es; ++b)
      if (bytes[es * i + b] != 0x7E) return false;
    return true;
  }
};

struct Tol {
  double atol, rtol;
};
Tol tol_of(DType dt) {
  switch (dt) {
    case DType::kFloat32: return {1e-5, 1e-5};
    case DType::kFloat16: return {1e-5, 1e-3};
    case DType::kBFloat16: return {1e-5, 8e-3};
  }
  return {0, 0};
}
const char* dtype_name(DType dt) {
  return dt == DType::kFloat32 ? "f32" : dt == DType::kFloat16 ? "f16" : "bf16";
}

// ---------------------------------------------------------------------------
// The DPE configuration of one test and its float64 reference.
enum class MaskKind { kNone, kPerQueryHead, kPerKvHead };
const char* mask_name(MaskKind m) {
  return m == MaskKind::kNone ? "nomask" : m == MaskKind::kPerQueryHead ? "mask_q" : "mask_kv";
}

struct Config {
  int64_t Hq = 8, Hk = 2, D = 40, R = 32, window = 7;
  Layout layout = Layout::kNeox;
  MaskKind mask_kind = MaskKind::kNone;
  std::vector<float> inv_freq;
  std::vector<int64_t> pair_scale;
  std::vector<uint8_t> mask;  // [Hm, P]
  int64_t P() const { return R / 2; }
  int64_t Hm() const {
    return mask_kind == MaskKind::kNone ? 0 : mask_kind == MaskKind::kPerQueryHead ? Hq : Hk;
  }
  int64_t Hks() const { return mask_kind == MaskKind::kNone ? Hk : Hm(); }
  bool neox() const { return layout == Layout::kNeox; }
};

Config make_config(int64_t Hq, int64_t Hk, int64_t D, int64_t R, Layout layout, MaskKind mk,
                   Rng& rng) {
  Config c;
  c.Hq = Hq;
  c.Hk = Hk;
  c.D = D;
  c.R = R;
  c.layout = layout;
  c.mask_kind = mk;
  const int64_t P = c.P();
  c.inv_freq.resize(P);
  for (int64_t i = 0; i < P; ++i)  // pair 0 at inv_freq 1 (largest angles), base 10000
    c.inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / R));
  // Four groups of equal size, scales 1, 2, 4, 16 (window 7 is a multiple of none).
  const int64_t scales[4] = {1, 2, 4, 16};
  c.pair_scale.resize(P);
  for (int64_t i = 0; i < P; ++i) c.pair_scale[i] = scales[std::min<int64_t>(3, 4 * i / P)];
  c.mask.resize(static_cast<size_t>(c.Hm() * P));
  for (auto& m : c.mask) m = rng.uniform() < 0.6 ? 1 : 0;
  return c;
}

enum class Kind { kQNormal, kQScaled, kKNormal, kKScaled };

// Expected output element d of head `head` (a query head for kQ*, a KV head
// for kKNormal, a scaled key head for kKScaled) for a token at position m,
// whose input head vector is x (double, D elements).
double reference(const Config& c, Kind kind, int64_t head, int64_t m, const double* x, int64_t d) {
  if (d >= c.R) return x[d];
  const int64_t P = c.P();
  int64_t i;
  bool first;
  if (c.neox()) {
    i = d < P ? d : d - P;
    first = d < P;
  } else {
    i = d / 2;
    first = d % 2 == 0;
  }
  const int64_t i0 = c.neox() ? i : 2 * i, i1 = c.neox() ? i + P : 2 * i + 1;
  const int64_t s = c.pair_scale[i], w = c.window;
  bool key_dim = true;
  if (c.mask_kind != MaskKind::kNone) {
    int64_t row = head;
    if (kind == Kind::kQScaled && c.mask_kind == MaskKind::kPerKvHead) row = head / (c.Hq / c.Hk);
    key_dim = c.mask[static_cast<size_t>(row * P + i)] != 0;
  }
  int64_t index = m;
  if (kind == Kind::kQScaled && key_dim) index = m / s + (w - w / s);
  if (kind == Kind::kKScaled && key_dim) index = m / s;
  // The angle in float32, as docs/method.md and Hugging Face define it; then exact-ish sin/cos.
  const float phi = static_cast<float>(index) * c.inv_freq[i];
  const double co = std::cos(static_cast<double>(phi)), si = std::sin(static_cast<double>(phi));
  const double a = x[i0], b = x[i1];
  return first ? a * co - b * si : a * si + b * co;
}

// ---------------------------------------------------------------------------
// A strided [B, S, H, D] view into a buffer (outer = batch or block, inner =
// token or slot).
struct View {
  int64_t offset, outer, inner, head;
  int64_t at(int64_t o, int64_t i, int64_t h, int64_t d) const {
    return offset + o * outer + i * inner + h * head + d;
  }
};

// Buffer elements a [n0, n1, H, D] view covers, for sentinel checks.
std::vector<bool> covered(int64_t size, const View& v, int64_t n0, int64_t n1, int64_t H, int64_t D) {
  std::vector<bool> m(static_cast<size_t>(size), false);
  for (int64_t a = 0; a < n0; ++a)
    for (int64_t b = 0; b < n1; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) m[static_cast<size_t>(v.at(a, b, h, d))] = true;
  return m;
}

int64_t extent(const View& v, int64_t n0, int64_t n1, int64_t H, int64_t D) {
  return v.at(n0 - 1, n1 - 1, H - 1, D - 1) + 1;
}

dpe::RowStrides row_strides(const View& v) { return {v.outer, v.inner, v.head}; }

// Compare a strided output with the reference; check the rest of the buffer
// is untouched.
void check_output(const char* what, const Config& c, DType dt, Kind kind, const Buf& out,
                  const View& ov, const Buf& in, const View& iv, int64_t B, int64_t S, int64_t H,
                  const std::vector<int64_t>& pos, bool sentinel_check, const std::string& tag) {
  const Tol tol = tol_of(dt);
  std::vector<double> x(static_cast<size_t>(c.D));
  int bad = 0;
  double worst = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t m = pos[static_cast<size_t>(b * S + s)];
      for (int64_t h = 0; h < H; ++h) {
        int64_t src = h;  // input head
        if (kind == Kind::kKScaled) src = h / (c.Hks() / c.Hk);
        for (int64_t d = 0; d < c.D; ++d) x[static_cast<size_t>(d)] = in.get(iv.at(b, s, src, d));
        for (int64_t d = 0; d < c.D; ++d) {
          const double ref = reference(c, kind, h, m, x.data(), d);
          const double got = out.get(ov.at(b, s, h, d));
          const double err = std::fabs(got - ref);
          if (!(err <= tol.atol + tol.rtol * std::fabs(ref))) {
            if (bad < 3)
              std::printf("  %s %s: b=%lld s=%lld m=%lld h=%lld d=%lld got %.9g ref %.9g\n",
                          tag.c_str(), what, (long long)b, (long long)s, (long long)m,
                          (long long)h, (long long)d, got, ref);
            ++bad;
          }
          if (err > worst) worst = err;
        }
      }
    }
  }
  CHECK(bad == 0, "%s %s: %d elements out of tolerance (worst abs err %.3g)", tag.c_str(), what,
        bad, worst);
  if (sentinel_check) {
    const std::vector<bool> cov = covered(out.size(), ov, B, S, H, c.D);
    int64_t touched = 0;
    for (int64_t i = 0; i < out.size(); ++i)
      if (!cov[static_cast<size_t>(i)] && !out.is_sentinel(i)) ++touched;
    CHECK(touched == 0, "%s %s: %lld elements outside the view were written", tag.c_str(), what,
          (long long)touched);
  }
}

// ---------------------------------------------------------------------------
// rope_cpu: strided inputs, strided outputs, in place, threads, every ISA.
struct RopeCase {
  Config c;
  DType dt;
  IndexType pt;
  int64_t B, S;
  std::vector<int64_t> pos;  // [B * S]
  bool aligned = false;      // contiguous rows at 64-byte aligned addresses (streaming stores)
};

struct RopeRun {
  Buf qkv, qn, kn, qs, ks;
  View qv, kv, qnv, knv, qsv, ksv;
};

// The packed qkv buffer: per token a row [q heads | k heads | v heads | pad 5],
// q and k views into it (token stride = row length, batch stride = S rows + 3).
RopeRun make_run(const RopeCase& rc, Rng& rng) {
  const Config& c = rc.c;
  const int64_t row = (c.Hq + 2 * c.Hk) * c.D + (rc.aligned ? 0 : 5);
  const int64_t bstride = rc.S * row + (rc.aligned ? 0 : 3);
  RopeRun r{Buf(rc.dt, rc.B * bstride), Buf(rc.dt, 1), Buf(rc.dt, 1), Buf(rc.dt, 1), Buf(rc.dt, 1),
            {}, {}, {}, {}, {}, {}};
  for (int64_t i = 0; i < r.qkv.size(); ++i) r.qkv.set(i, rng.symmetric());
  r.qv = {0, bstride, row, c.D};
  r.kv = {c.Hq * c.D, bstride, row, c.D};
  // Outputs: padded head, token and batch strides, each a different layout.
  r.qnv = {2, rc.S * (c.Hq * (c.D + 3) + 1) + 7, c.Hq * (c.D + 3) + 1, c.D + 3};
  r.knv = {0, rc.S * c.Hk * c.D, c.Hk * c.D, c.D};  // contiguous
  // q_scaled head-major inside each sequence: [B, H, S, D] storage viewed as [B, S, H, D]
  r.qsv = {1, c.Hq * rc.S * (c.D + 1), c.D + 1, rc.S * (c.D + 1)};
  r.ksv = {5, rc.S * c.Hks() * (c.D + 2) + 11, c.Hks() * (c.D + 2), c.D + 2};
  if (rc.aligned) {  // every output contiguous [B, S, H, D] from offset 0
    r.qnv = {0, rc.S * c.Hq * c.D, c.Hq * c.D, c.D};
    r.qsv = r.qnv;
    r.ksv = {0, rc.S * c.Hks() * c.D, c.Hks() * c.D, c.D};
  }
  r.qn = Buf(rc.dt, extent(r.qnv, rc.B, rc.S, c.Hq, c.D) + 4);
  r.kn = Buf(rc.dt, extent(r.knv, rc.B, rc.S, c.Hk, c.D));
  r.qs = Buf(rc.dt, extent(r.qsv, rc.B, rc.S, c.Hq, c.D) + 2);
  r.ks = Buf(rc.dt, extent(r.ksv, rc.B, rc.S, c.Hks(), c.D) + 9);
  return r;
}

struct PosBuf {
  std::vector<int32_t> i32;
  std::vector<int64_t> i64;
  const void* data(IndexType pt) const {
    return pt == IndexType::kInt32 ? static_cast<const void*>(i32.data())
                                   : static_cast<const void*>(i64.data());
  }
};

PosBuf make_pos(const std::vector<int64_t>& pos) {
  PosBuf p;
  for (int64_t m : pos) {
    p.i32.push_back(static_cast<int32_t>(m));
    p.i64.push_back(m);
  }
  return p;
}

dpe::RopeParams rope_params(const RopeCase& rc, RopeRun& r, const PosBuf& pb) {
  const Config& c = rc.c;
  dpe::RopeParams p;
  p.q = static_cast<const uint8_t*>(r.qkv.data()) + r.qv.offset * elem_size(rc.dt);
  p.q_strides = row_strides(r.qv);
  p.k = static_cast<const uint8_t*>(r.qkv.data()) + r.kv.offset * elem_size(rc.dt);
  p.k_strides = row_strides(r.kv);
  p.positions = pb.data(rc.pt);
  p.pos_stride_batch = rc.S;
  p.pos_stride_token = 1;
  p.inv_freq = c.inv_freq.data();
  p.pair_scale = c.pair_scale.data();
  p.mask = c.mask_kind == MaskKind::kNone ? nullptr : c.mask.data();
  p.mask_heads = c.Hm();
  const size_t es = elem_size(rc.dt);
  p.q_normal = static_cast<uint8_t*>(r.qn.data()) + r.qnv.offset * es;
  p.q_normal_strides = row_strides(r.qnv);
  p.k_normal = static_cast<uint8_t*>(r.kn.data()) + r.knv.offset * es;
  p.k_normal_strides = row_strides(r.knv);
  p.q_scaled = static_cast<uint8_t*>(r.qs.data()) + r.qsv.offset * es;
  p.q_scaled_strides = row_strides(r.qsv);
  p.k_scaled = static_cast<uint8_t*>(r.ks.data()) + r.ksv.offset * es;
  p.k_scaled_strides = row_strides(r.ksv);
  p.batch = rc.B;
  p.seqlen = rc.S;
  p.heads_q = c.Hq;
  p.heads_k = c.Hk;
  p.head_dim = c.D;
  p.rotary_dim = c.R;
  p.window = c.window;
  p.dtype = rc.dt;
  p.pos_type = rc.pt;
  p.layout = c.layout;
  return p;
}

std::vector<int64_t> test_positions(int64_t n, IndexType pt, Rng& rng) {
  // Small positions (inside and around the window), consecutive runs, and
  // large ones: 2^20 and beyond, and past the fast sin/cos range
  // (3e8 rad at inv_freq 1 > 2^28).
  std::vector<int64_t> pos;
  const int64_t big[] = {(int64_t{1} << 20), (int64_t{1} << 20) + 12345, 1000003, 16777217, 300000000};
  for (int64_t i = 0; i < n; ++i) {
    if (i < 6) pos.push_back(i);
    else if (i % 3 == 0) pos.push_back(big[(i / 3) % 5]);
    else pos.push_back(static_cast<int64_t>(rng.uniform() * 5000));
  }
  if (pt == IndexType::kInt64) pos.back() = 3000000000LL;  // > int32
  return pos;
}

void test_rope_case(const RopeCase& rc, Rng& rng, bool all_isas) {
  const Config& c = rc.c;
  const std::string tag = std::string("rope ") + (c.neox() ? "neox " : "gptj ") +
                          dtype_name(rc.dt) + " " + mask_name(c.mask_kind) +
                          (rc.pt == IndexType::kInt32 ? " i32" : " i64") + " D=" +
                          std::to_string(c.D) + " R=" + std::to_string(c.R);
  const PosBuf pb = make_pos(rc.pos);
  RopeRun base = make_run(rc, rng);

  std::vector<dpe::CpuIsa> isas = {dpe::active_cpu_isa()};
  if (all_isas) isas = {dpe::CpuIsa::kBaseline, dpe::CpuIsa::kAvx2, dpe::CpuIsa::kAvx512, dpe::CpuIsa::kAvx512Bf16};
  for (dpe::CpuIsa isa : isas) {
    if (!dpe::cpu_isa_supported(isa)) continue;
    CHECK(dpe::set_cpu_isa(isa), "set_cpu_isa");
    const std::string itag = tag + " isa=" + std::to_string(static_cast<int>(isa));
    RopeRun r = base;
    dpe::RopeParams p = rope_params(rc, r, pb);
    const dpe::Status st = dpe::rope_cpu(p, 1);
    CHECK(st.ok(), "%s: status %s (%s)", itag.c_str(), dpe::error_code_name(st.code), st.message);
    check_output("q_normal", c, rc.dt, Kind::kQNormal, r.qn, r.qnv, r.qkv, r.qv, rc.B, rc.S, c.Hq, rc.pos, true, itag);
    check_output("k_normal", c, rc.dt, Kind::kKNormal, r.kn, r.knv, r.qkv, r.kv, rc.B, rc.S, c.Hk, rc.pos, true, itag);
    check_output("q_scaled", c, rc.dt, Kind::kQScaled, r.qs, r.qsv, r.qkv, r.qv, rc.B, rc.S, c.Hq, rc.pos, true, itag);
    check_output("k_scaled", c, rc.dt, Kind::kKScaled, r.ks, r.ksv, r.qkv, r.kv, rc.B, rc.S, c.Hks(), rc.pos, true, itag);
    CHECK(r.qkv.bytes == base.qkv.bytes, "%s: the inputs were modified", itag.c_str());

    // OpenMP default threads: bitwise equal to one thread.
    RopeRun rt = base;
    dpe::RopeParams pt = rope_params(rc, rt, pb);
    CHECK(dpe::rope_cpu(pt, 0).ok(), "%s: threads", itag.c_str());
    CHECK(rt.qn.bytes == r.qn.bytes && rt.kn.bytes == r.kn.bytes && rt.qs.bytes == r.qs.bytes &&
              rt.ks.bytes == r.ks.bytes,
          "%s: multi-threaded outputs differ from one thread", itag.c_str());

    // In place: q_normal is q, k_normal is k (same strides); bitwise equal to
    // the out-of-place results, and the rest of the qkv buffer (v, padding)
    // untouched.
    RopeRun ri = base;
    dpe::RopeParams pi = rope_params(rc, ri, pb);
    pi.q_normal = const_cast<void*>(pi.q);
    pi.q_normal_strides = pi.q_strides;
    pi.k_normal = const_cast<void*>(pi.k);
    pi.k_normal_strides = pi.k_strides;
    const dpe::Status sti = dpe::rope_cpu(pi, 0);
    CHECK(sti.ok(), "%s in place: %s", itag.c_str(), sti.message);
    int64_t diff = 0;
    for (int64_t b = 0; b < rc.B; ++b)
      for (int64_t s = 0; s < rc.S; ++s)
        for (int64_t d = 0; d < c.D; ++d) {
          for (int64_t h = 0; h < c.Hq; ++h)
            diff += !ri.qkv.same_bits(ri.qv.at(b, s, h, d), r.qn, r.qnv.at(b, s, h, d));
          for (int64_t h = 0; h < c.Hk; ++h)
            diff += !ri.qkv.same_bits(ri.kv.at(b, s, h, d), r.kn, r.knv.at(b, s, h, d));
        }
    CHECK(diff == 0, "%s in place: %lld normal elements differ from out of place", itag.c_str(),
          (long long)diff);
    CHECK(ri.qs.bytes == r.qs.bytes && ri.ks.bytes == r.ks.bytes,
          "%s in place: scaled outputs differ from out of place", itag.c_str());
    const std::vector<bool> qcov = covered(base.qkv.size(), base.qv, rc.B, rc.S, c.Hq, c.D);
    const std::vector<bool> kcov = covered(base.qkv.size(), base.kv, rc.B, rc.S, c.Hk, c.D);
    int64_t stray = 0;
    for (int64_t i = 0; i < base.qkv.size(); ++i)
      if (!qcov[static_cast<size_t>(i)] && !kcov[static_cast<size_t>(i)])
        stray += !ri.qkv.same_bits(i, base.qkv, i);
    CHECK(stray == 0, "%s in place: %lld elements outside q and k changed", itag.c_str(), (long long)stray);
  }
  dpe::set_cpu_isa(dpe::CpuIsa::kAuto);
}

// Batch of one sequence of positions broadcast over B (pos_stride_batch = 0).
void test_broadcast_positions(Rng& rng) {
  RopeCase rc{make_config(4, 4, 16, 16, Layout::kNeox, MaskKind::kNone, rng), DType::kFloat32,
              IndexType::kInt64, 3, 5, {}};
  std::vector<int64_t> one = {0, 3, 9, 1 << 21, 77};
  for (int64_t b = 0; b < rc.B; ++b) rc.pos.insert(rc.pos.end(), one.begin(), one.end());
  const PosBuf pb = make_pos(one);
  RopeRun r = make_run(rc, rng);
  dpe::RopeParams p = rope_params(rc, r, pb);
  p.pos_stride_batch = 0;
  CHECK(dpe::rope_cpu(p).ok(), "broadcast positions");
  check_output("q_scaled", rc.c, rc.dt, Kind::kQScaled, r.qs, r.qsv, r.qkv, r.qv, rc.B, rc.S, 4,
               rc.pos, true, "rope broadcast positions");
}

// ---------------------------------------------------------------------------
// rope_and_cache_cpu vs rope_cpu on the same tokens + indexing by slot.
void test_rope_and_cache(Layout layout, MaskKind mk, DType dt, bool q_in_place, Rng& rng) {
  const Config c = make_config(8, 2, 40, 32, layout, mk, rng);
  const std::string tag = std::string("rope_and_cache ") + (c.neox() ? "neox " : "gptj ") +
                          dtype_name(dt) + " " + mask_name(mk) + (q_in_place ? " q_in_place" : "");
  const int64_t T = 11, NB = 5, BS = 4, Dv = 24;
  // Slots: scattered over blocks, -1 (padding) for three tokens.
  const std::vector<int64_t> slots = {5, -1, 0, 19, 7, 12, -1, 3, 16, -1, 9};
  std::vector<int64_t> pos = test_positions(T, IndexType::kInt64, rng);
  pos.back() = 123456789;
  const PosBuf pb = make_pos(pos);
  const size_t es = elem_size(dt);

  // Packed qkv rows [q | k | v(Dv) | pad] per token.
  const int64_t row = c.Hq * c.D + c.Hk * c.D + c.Hk * Dv + 3;
  Buf qkv(dt, T * row);
  for (int64_t i = 0; i < qkv.size(); ++i) qkv.set(i, rng.symmetric());
  const View qv{0, 0, row, c.D}, kv{c.Hq * c.D, 0, row, c.D};
  const View vv{c.Hq * c.D + c.Hk * c.D, 0, row, Dv};
  // Caches: k head-major [NB, H, BS, D]; ks and v slot-major with padding.
  const View kcv{0, c.Hk * BS * c.D, c.D, BS * c.D};
  const View kscv{3, BS * c.Hks() * (c.D + 1) + 2, c.Hks() * (c.D + 1), c.D + 1};
  const View vcv{1, BS * c.Hk * Dv, c.Hk * Dv, Dv};
  Buf kc(dt, extent(kcv, NB, BS, c.Hk, c.D)), ksc(dt, extent(kscv, NB, BS, c.Hks(), c.D) + 5),
      vc(dt, extent(vcv, NB, BS, c.Hk, Dv) + 1);
  const View qnv{0, 0, c.Hq * (c.D + 2), c.D + 2}, qsv{0, 0, c.Hq * c.D, c.D};
  Buf qn(dt, T * c.Hq * (c.D + 2)), qs(dt, T * c.Hq * c.D);
  Buf qkv0 = qkv;

  dpe::RopeCacheParams p;
  uint8_t* base = static_cast<uint8_t*>(qkv.data());
  p.q = base + qv.offset * es;
  p.q_strides = {qv.inner, qv.head};
  p.k = base + kv.offset * es;
  p.k_strides = {kv.inner, kv.head};
  p.v = base + vv.offset * es;
  p.v_strides = {vv.inner, vv.head};
  p.positions = pb.data(IndexType::kInt64);
  p.slot_mapping = slots.data();
  p.inv_freq = c.inv_freq.data();
  p.pair_scale = c.pair_scale.data();
  p.mask = mk == MaskKind::kNone ? nullptr : c.mask.data();
  p.mask_heads = c.Hm();
  p.q_normal = q_in_place ? const_cast<void*>(p.q) : qn.data();
  p.q_normal_strides = q_in_place ? p.q_strides : dpe::TokenStrides{qnv.inner, qnv.head};
  p.q_scaled = qs.data();
  p.q_scaled_strides = {qsv.inner, qsv.head};
  p.k_cache = static_cast<uint8_t*>(kc.data()) + kcv.offset * es;
  p.k_cache_strides = {kcv.outer, kcv.inner, kcv.head};
  p.ks_cache = static_cast<uint8_t*>(ksc.data()) + kscv.offset * es;
  p.ks_cache_strides = {kscv.outer, kscv.inner, kscv.head};
  p.v_cache = static_cast<uint8_t*>(vc.data()) + vcv.offset * es;
  p.v_cache_strides = {vcv.outer, vcv.inner, vcv.head};
  p.num_tokens = T;
  p.heads_q = c.Hq;
  p.heads_k = c.Hk;
  p.head_dim = c.D;
  p.v_head_dim = Dv;
  p.rotary_dim = c.R;
  p.window = c.window;
  p.num_blocks = NB;
  p.block_size = BS;
  p.dtype = dt;
  p.pos_type = IndexType::kInt64;
  p.layout = layout;

  // A slot outside the cache: refused before anything is written.
  {
    std::vector<int64_t> bad = slots;
    bad[4] = NB * BS;
    dpe::RopeCacheParams pbad = p;
    pbad.slot_mapping = bad.data();
    const dpe::Status st = dpe::rope_and_cache_cpu(pbad);
    CHECK(st.code == ErrorCode::kInvalidValue && std::strstr(st.message, "slot_mapping"),
          "%s: out-of-range slot gave %s", tag.c_str(), dpe::error_code_name(st.code));
    bool untouched = qkv.bytes == qkv0.bytes;
    for (const Buf* b : {&kc, &ksc, &vc, &qn, &qs})
      for (int64_t i = 0; i < b->size(); ++i) untouched = untouched && b->is_sentinel(i);
    CHECK(untouched, "%s: a refused call wrote something", tag.c_str());
  }

  const dpe::Status st = dpe::rope_and_cache_cpu(p);
  CHECK(st.ok(), "%s: %s", tag.c_str(), st.message);

  // Expected: rope_cpu on the same (original) q, k as [1, T] with contiguous outputs.
  Buf eqn(dt, T * c.Hq * c.D), ekn(dt, T * c.Hk * c.D), eqs(dt, T * c.Hq * c.D),
      eks(dt, T * c.Hks() * c.D);
  dpe::RopeParams rp;
  const uint8_t* base0 = static_cast<const uint8_t*>(qkv0.data());
  rp.q = base0 + qv.offset * es;
  rp.q_strides = {0, qv.inner, qv.head};
  rp.k = base0 + kv.offset * es;
  rp.k_strides = {0, kv.inner, kv.head};
  rp.positions = pb.data(IndexType::kInt64);
  rp.pos_stride_batch = 0;
  rp.inv_freq = c.inv_freq.data();
  rp.pair_scale = c.pair_scale.data();
  rp.mask = p.mask;
  rp.mask_heads = p.mask_heads;
  rp.q_normal = eqn.data();
  rp.q_normal_strides = {0, c.Hq * c.D, c.D};
  rp.k_normal = ekn.data();
  rp.k_normal_strides = {0, c.Hk * c.D, c.D};
  rp.q_scaled = eqs.data();
  rp.q_scaled_strides = {0, c.Hq * c.D, c.D};
  rp.k_scaled = eks.data();
  rp.k_scaled_strides = {0, c.Hks() * c.D, c.D};
  rp.batch = 1;
  rp.seqlen = T;
  rp.heads_q = c.Hq;
  rp.heads_k = c.Hk;
  rp.head_dim = c.D;
  rp.rotary_dim = c.R;
  rp.window = c.window;
  rp.dtype = dt;
  rp.pos_type = IndexType::kInt64;
  rp.layout = layout;
  CHECK(dpe::rope_cpu(rp).ok(), "%s: rope_cpu", tag.c_str());
  // rope_cpu itself is checked against the float64 reference here as well.
  const View eqv{0, 0, c.Hq * c.D, c.D}, ekv{0, 0, c.Hk * c.D, c.D}, eksv{0, 0, c.Hks() * c.D, c.D};
  check_output("k_scaled", c, dt, Kind::kKScaled, eks, eksv, qkv0, kv, 1, T, c.Hks(), pos, false, tag);

  int64_t diff = 0;
  const Buf& qn_buf = q_in_place ? qkv : qn;
  const View qn_view = q_in_place ? qv : qnv;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t d = 0; d < c.D; ++d) {
        diff += !qn_buf.same_bits(qn_view.at(0, t, h, d), eqn, eqv.at(0, t, h, d));
        diff += !qs.same_bits(qsv.at(0, t, h, d), eqs, eqv.at(0, t, h, d));
      }
  CHECK(diff == 0, "%s: %lld q output elements differ from rope_cpu", tag.c_str(), (long long)diff);

  // Caches: each written slot holds the token's rope_cpu rows / v row; every
  // other element (skipped tokens' slots, unused slots, padding) untouched.
  std::vector<bool> kw(static_cast<size_t>(kc.size()), false), ksw(static_cast<size_t>(ksc.size()), false),
      vw(static_cast<size_t>(vc.size()), false);
  diff = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = slots[static_cast<size_t>(t)];
    if (slot < 0) continue;
    const int64_t blk = slot / BS, off = slot % BS;
    for (int64_t h = 0; h < c.Hk; ++h)
      for (int64_t d = 0; d < c.D; ++d) {
        const int64_t i = kcv.at(blk, off, h, d);
        kw[static_cast<size_t>(i)] = true;
        diff += !kc.same_bits(i, ekn, ekv.at(0, t, h, d));
      }
    for (int64_t h = 0; h < c.Hks(); ++h)
      for (int64_t d = 0; d < c.D; ++d) {
        const int64_t i = kscv.at(blk, off, h, d);
        ksw[static_cast<size_t>(i)] = true;
        diff += !ksc.same_bits(i, eks, eksv.at(0, t, h, d));
      }
    for (int64_t h = 0; h < c.Hk; ++h)
      for (int64_t d = 0; d < Dv; ++d) {
        const int64_t i = vcv.at(blk, off, h, d);
        vw[static_cast<size_t>(i)] = true;
        diff += !vc.same_bits(i, qkv0, vv.at(0, t, h, d));
      }
  }
  CHECK(diff == 0, "%s: %lld cache elements differ from rope_cpu / v", tag.c_str(), (long long)diff);
  int64_t stray = 0;
  for (int64_t i = 0; i < kc.size(); ++i) stray += !kw[static_cast<size_t>(i)] && !kc.is_sentinel(i);
  for (int64_t i = 0; i < ksc.size(); ++i) stray += !ksw[static_cast<size_t>(i)] && !ksc.is_sentinel(i);
  for (int64_t i = 0; i < vc.size(); ++i) stray += !vw[static_cast<size_t>(i)] && !vc.is_sentinel(i);
  CHECK(stray == 0, "%s: %lld cache elements outside the written slots changed", tag.c_str(),
        (long long)stray);
  if (!q_in_place) CHECK(qkv.bytes == qkv0.bytes, "%s: inputs modified", tag.c_str());
}

// ---------------------------------------------------------------------------
// Validation: each bad argument gives its code and a message naming it, and
// nothing is written.
void test_validation(Rng& rng) {
  RopeCase rc{make_config(8, 2, 16, 16, Layout::kNeox, MaskKind::kPerQueryHead, rng),
              DType::kFloat16, IndexType::kInt32, 1, 4, {0, 1, 2, 3}};
  const PosBuf pb = make_pos(rc.pos);
  RopeRun r = make_run(rc, rng);
  const dpe::RopeParams good = rope_params(rc, r, pb);
  CHECK(dpe::validate_rope(good).ok(), "good params validate");

  struct Bad {
    const char* what;
    ErrorCode code;
    const char* name;  // must appear in the message
    void (*mutate)(dpe::RopeParams&);
  };
  const Bad bads[] = {
      {"null q", ErrorCode::kNullPointer, "q", [](dpe::RopeParams& p) { p.q = nullptr; }},
      {"null k_scaled", ErrorCode::kNullPointer, "k_scaled", [](dpe::RopeParams& p) { p.k_scaled = nullptr; }},
      {"null positions", ErrorCode::kNullPointer, "positions", [](dpe::RopeParams& p) { p.positions = nullptr; }},
      {"heads", ErrorCode::kInvalidHeads, "heads_q", [](dpe::RopeParams& p) { p.heads_k = 3; }},
      {"zero heads", ErrorCode::kInvalidHeads, "heads_k", [](dpe::RopeParams& p) { p.heads_k = 0; }},
      {"odd rotary", ErrorCode::kInvalidRotaryDim, "rotary_dim", [](dpe::RopeParams& p) { p.rotary_dim = 15; }},
      {"rotary > D", ErrorCode::kInvalidRotaryDim, "rotary_dim", [](dpe::RopeParams& p) { p.rotary_dim = 18; }},
      {"window", ErrorCode::kInvalidWindow, "window", [](dpe::RopeParams& p) { p.window = 0; }},
      {"mask heads", ErrorCode::kInvalidMask, "mask_heads", [](dpe::RopeParams& p) { p.mask_heads = 4; }},
      {"neg stride", ErrorCode::kInvalidStride, "strides", [](dpe::RopeParams& p) { p.q_scaled_strides.head = -1; }},
      {"neg batch", ErrorCode::kInvalidShape, "batch", [](dpe::RopeParams& p) { p.batch = -1; }},
      {"dtype", ErrorCode::kInvalidEnum, "dtype", [](dpe::RopeParams& p) { p.dtype = static_cast<DType>(7); }},
      {"layout", ErrorCode::kInvalidEnum, "layout", [](dpe::RopeParams& p) { p.layout = static_cast<Layout>(2); }},
      {"pos type", ErrorCode::kInvalidEnum, "pos_type", [](dpe::RopeParams& p) { p.pos_type = static_cast<IndexType>(-1); }},
      {"q_scaled is q", ErrorCode::kInvalidAlias, "q_scaled", [](dpe::RopeParams& p) { p.q_scaled = const_cast<void*>(p.q); }},
      {"k_scaled is k", ErrorCode::kInvalidAlias, "k_scaled", [](dpe::RopeParams& p) { p.k_scaled = const_cast<void*>(p.k); }},
      {"in place, other strides", ErrorCode::kInvalidAlias, "q_normal",
       [](dpe::RopeParams& p) { p.q_normal = const_cast<void*>(p.q); }},
      {"k_normal is q", ErrorCode::kInvalidAlias, "k_normal",
       [](dpe::RopeParams& p) { p.k_normal = const_cast<void*>(p.q); p.k_normal_strides = p.q_strides; }},
      {"two outputs", ErrorCode::kInvalidAlias, "outputs", [](dpe::RopeParams& p) { p.k_scaled = p.q_scaled; }},
  };
  const auto before = r.qn.bytes;
  for (const Bad& b : bads) {
    dpe::RopeParams p = good;
    b.mutate(p);
    const dpe::Status st = dpe::rope_cpu(p);
    CHECK(st.code == b.code, "validation %s: got %s (%s)", b.what, dpe::error_code_name(st.code), st.message);
    CHECK(std::strstr(st.message, b.name) != nullptr, "validation %s: message '%s' lacks '%s'", b.what,
          st.message, b.name);
  }
  // Values read on the host: pair_scale >= 1, positions >= 0.
  {
    Config c = rc.c;
    c.pair_scale[3] = 0;
    dpe::RopeParams p = good;
    p.pair_scale = c.pair_scale.data();
    const dpe::Status st = dpe::rope_cpu(p);
    CHECK(st.code == ErrorCode::kInvalidValue && std::strstr(st.message, "pair_scale"), "pair_scale 0: %s",
          st.message);
  }
  {
    PosBuf neg = make_pos({0, 1, -2, 3});
    dpe::RopeParams p = good;
    p.positions = neg.data(IndexType::kInt32);
    const dpe::Status st = dpe::rope_cpu(p);
    CHECK(st.code == ErrorCode::kInvalidValue && std::strstr(st.message, "positions"),
          "negative position: %s", st.message);
  }
  CHECK(r.qn.bytes == before, "a refused call wrote q_normal");
  // Zero tokens: nothing to do, null pointers allowed.
  {
    dpe::RopeParams p = good;
    p.seqlen = 0;
    p.q = p.k = nullptr;
    p.q_normal = p.k_normal = p.q_scaled = p.k_scaled = nullptr;
    CHECK(dpe::rope_cpu(p).ok(), "zero tokens");
  }
  // rope_and_cache-specific checks.
  {
    dpe::RopeCacheParams p;
    p.num_tokens = 1;
    p.heads_q = p.heads_k = 1;
    p.head_dim = p.rotary_dim = 4;
    p.v_head_dim = 4;
    p.num_blocks = 1;
    p.block_size = 0;
    CHECK(dpe::validate_rope_and_cache(p).code == ErrorCode::kInvalidShape, "block_size 0");
    p.block_size = 16;
    p.v_head_dim = 0;
    CHECK(dpe::validate_rope_and_cache(p).code == ErrorCode::kInvalidShape, "v_head_dim 0");
    p.v_head_dim = 4;
    const dpe::Status st = dpe::validate_rope_and_cache(p);
    CHECK(st.code == ErrorCode::kNullPointer, "null q in rope_and_cache: %s", st.message);
  }
  CHECK(std::string(dpe::error_code_name(ErrorCode::kInvalidAlias)) == "kInvalidAlias", "error_code_name");
}

// ---------------------------------------------------------------------------
// Storage conversions: float16 (the header's type, and its portable
// fallback) and bfloat16, against decoders written here.
void test_conversions(Rng& rng) {
  int64_t bad_decode = 0, bad_roundtrip = 0, bad_round = 0, bad_fallback = 0;
  for (uint32_t u = 0; u < 65536; ++u) {
    dpe::half_storage h;
    h.bits = static_cast<uint16_t>(u);
    const double ref = decode_half(static_cast<uint16_t>(u));
    const float f = static_cast<float>(h);
    if (std::isnan(ref) ? !std::isnan(f) : static_cast<double>(f) != ref) ++bad_decode;
    if (!std::isnan(ref) && dpe::half_storage(f).bits != u) ++bad_roundtrip;
  }
  // Random floats over the half range (and beyond): the result is the nearest
  // half, ties to even; overflow to inf at 65520.
  for (int n = 0; n < 200000; ++n) {
    const double mag = std::ldexp(rng.uniform() + 0.5, static_cast<int>(rng.next() % 50) - 30);
    const float f = static_cast<float>((rng.next() & 1) ? -mag : mag);
    const uint16_t got = dpe::half_storage(f).bits;
    const double g = decode_half(got);
    bool ok;
    if (std::fabs(f) >= 65520.0) {
      ok = std::isinf(g) && ((g < 0) == (f < 0));
    } else {
      const double e = std::fabs(g - f);
      const double e_up = std::fabs(decode_half(static_cast<uint16_t>(got + 1)) - f);
      const double e_dn = (got & 0x7FFF) ? std::fabs(decode_half(static_cast<uint16_t>(got - 1)) - f) : INFINITY;
      ok = e <= e_up && e <= e_dn && ((e != e_up && e != e_dn) || (got & 1) == 0);
    }
    if (!ok) ++bad_round;
    const dpe::CpuScalar<DType::kFloat16>::type h2(f);
    uint16_t b2;
    std::memcpy(&b2, &h2, 2);
    if (b2 != got) ++bad_fallback;  // the header's float16 type agrees with the fallback
  }
  CHECK(bad_decode == 0, "half_storage -> float: %lld wrong", (long long)bad_decode);
  CHECK(bad_roundtrip == 0, "half round trip: %lld wrong", (long long)bad_roundtrip);
  CHECK(bad_round == 0, "float -> half_storage rounding: %lld wrong", (long long)bad_round);
  CHECK(bad_fallback == 0, "float16 storage type vs half_storage: %lld differ", (long long)bad_fallback);
  CHECK(std::isnan(static_cast<float>(dpe::half_storage(NAN))), "half NaN");

  int64_t bad_bf16 = 0;
  for (int n = 0; n < 200000; ++n) {
    const double mag = std::ldexp(rng.uniform() + 0.5, static_cast<int>(rng.next() % 200) - 100);
    const float f = static_cast<float>((rng.next() & 1) ? -mag : mag);
    const uint16_t got = dpe::bf16_storage(f).bits;
    const double g = decode_bf16(got), e = std::fabs(g - f);
    const double e_up = std::fabs(decode_bf16(static_cast<uint16_t>(got + 1)) - f);
    const double e_dn = std::fabs(decode_bf16(static_cast<uint16_t>(got - 1)) - f);
    if (!(e <= e_up && e <= e_dn && ((e != e_up && e != e_dn) || (got & 1) == 0))) ++bad_bf16;
  }
  CHECK(bad_bf16 == 0, "float -> bf16_storage rounding: %lld wrong", (long long)bad_bf16);
  CHECK(std::isnan(static_cast<float>(dpe::bf16_storage(NAN))), "bf16 NaN");
}

}  // namespace

int main() {
  Rng rng(20250425);
  test_conversions(rng);
  test_validation(rng);
  test_broadcast_positions(rng);
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const MaskKind masks[] = {MaskKind::kNone, MaskKind::kPerQueryHead, MaskKind::kPerKvHead};
  // Twice: ordinary stores (these small calls are below the streaming
  // threshold), then every scaled output written by streaming stores.
  for (int64_t stream_min : {dpe::stream_min_bytes(), int64_t{0}}) {
    dpe::set_stream_min_bytes(stream_min);
    for (Layout layout : {Layout::kNeox, Layout::kGptj}) {
      for (DType dt : dtypes) {
        for (MaskKind mk : masks) {
          for (IndexType pt : {IndexType::kInt32, IndexType::kInt64}) {
            // GQA 8/2, partial rotary (D 40, R 32), two sequences of 9 tokens;
            // every compiled body for the float16 cases.
            RopeCase rc{make_config(8, 2, 40, 32, layout, mk, rng), dt, pt, 2, 9, {}};
            rc.pos = test_positions(rc.B * rc.S, pt, rng);
            test_rope_case(rc, rng, /*all_isas=*/true);
          }
          test_rope_and_cache(layout, mk, dt, false, rng);
          test_rope_and_cache(layout, mk, dt, true, rng);
        }
      }
      // Full rotary, D = 128 (the common head size: the long vector loop), MHA.
      RopeCase rc{make_config(4, 4, 128, 128, layout, MaskKind::kPerQueryHead, rng), DType::kBFloat16,
                  IndexType::kInt64, 1, 20, {}};
      rc.pos = test_positions(rc.S, IndexType::kInt64, rng);
      test_rope_case(rc, rng, true);
      // Aligned contiguous rows (the engine's common case): with streaming on,
      // the intrinsic bodies store these rows non-temporally. D = 128 and
      // partial rotary D = 128 / R = 96 (whole 16-pair vectors, pass-through
      // dims after them), D = 64 / R = 40 (a masked tail: never streamed).
      for (DType dt : dtypes) {
        for (MaskKind mk : masks) {
          const int64_t dims[3][2] = {{128, 128}, {128, 96}, {64, 40}};
          for (const auto& dr : dims) {
            RopeCase ra{make_config(4, 2, dr[0], dr[1], layout, mk, rng), dt, IndexType::kInt64, 2, 7, {}, true};
            ra.pos = test_positions(ra.B * ra.S, IndexType::kInt64, rng);
            test_rope_case(ra, rng, true);
          }
        }
      }
    }
  }
  dpe::set_stream_min_bytes(dpe::kStreamMinBytes);
  std::printf("test_rope_cpu: %d checks, %d failed (cpu isa: %d)\n", g_checks, g_failures,
              static_cast<int>(dpe::active_cpu_isa()));
  return g_failures == 0 ? 0 : 1;
}
