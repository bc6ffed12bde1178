// dpe::rope_cpu and dpe::paged_decode_cpu against the golden vectors written by
// `dpe parity --export DIR` (schema "dpe-golden" v1, docs/parity.md): the
// checked-in set csrc/tests/golden/ by default, or the directory given as
// argv[1]. This is also the example for an engine team that implements DPE in
// its own kernels: read the cases, run your kernel, compare.
//
// Format read here: manifest.txt, the line-oriented sidecar that the exporter
// writes next to manifest.json from the same data (so this test needs no JSON
// parser and no dependency):
//   dpe-golden 1
//   case NAME OP DTYPE                       OP: rope | paged | attention
//   param KEY VALUE...                       window, rotary_dim, layout, ...
//   input NAME DTYPE FILE NDIM D0 D1 ...     raw little-endian, row-major
//   expected NAME FILE TOLERANCE NDIM D0 ... float64, raw little-endian
//   end
// Rule: max |kernel output - expected| <= TOLERANCE per output (the tolerance
// already holds 2 x the same-dtype reference's error + atol[dtype]); equal
// infinities match (lse of a row with no key), NaN never does. Cases of ops
// this library has no CPU kernel for (batched attention) are skipped.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dpe/paged_decode_cpu.h"
#include "dpe/rope_cpu.h"

#ifndef DPE_GOLDEN_DIR
#define DPE_GOLDEN_DIR "golden"
#endif

namespace {

int g_cases = 0, g_failures = 0, g_skipped = 0;

struct Array {
  std::string dtype, file;
  std::vector<int64_t> shape;
  double tolerance = 0.0;
  std::vector<char> bytes;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  template <typename T>
  const T* as() const { return reinterpret_cast<const T*>(bytes.data()); }
};

struct Case {
  std::string name, op, dtype;
  std::map<std::string, std::vector<std::string>> params;
  std::map<std::string, Array> inputs, expected;
  int64_t param(const std::string& k) const { return std::stoll(params.at(k).at(0)); }
};

bool read_file(const std::string& path, std::vector<char>& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  out.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return true;
}

dpe::DType dtype_of(const std::string& s) {
  if (s == "float16") return dpe::DType::kFloat16;
  if (s == "bfloat16") return dpe::DType::kBFloat16;
  return dpe::DType::kFloat32;
}

size_t elem_size(dpe::DType dt) { return dt == dpe::DType::kFloat32 ? 4 : 2; }

double to_double(const char* p, dpe::DType dt) {
  if (dt == dpe::DType::kFloat32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t u;
  std::memcpy(&u, p, 2);
  if (dt == dpe::DType::kBFloat16) {
    dpe::bf16_storage b;
    b.bits = u;
    return static_cast<float>(b);
  }
  dpe::CpuScalar<dpe::DType::kFloat16>::type h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}

// Compare n values (read with `get(i)`) against the expected float64 array.
template <typename Get>
void compare(const Case& c, const std::string& name, int64_t n, Get get) {
  const Array& e = c.expected.at(name);
  if (e.numel() != n) {
    std::printf("FAIL %s: %s has %lld values, expected %lld\n", c.name.c_str(), name.c_str(),
                static_cast<long long>(n), static_cast<long long>(e.numel()));
    ++g_failures;
    return;
  }
  const double* want = e.as<double>();
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = get(i), w = want[i];
    double err;
    if (std::isinf(g) && std::isinf(w) && (g > 0) == (w > 0)) err = 0.0;
    else err = std::fabs(g - w);
    if (std::isnan(err)) err = INFINITY;
    if (err > worst) worst = err;
  }
  if (!(worst <= e.tolerance)) {
    std::printf("FAIL %s: %s max abs error %.3g > tolerance %.3g\n", c.name.c_str(), name.c_str(), worst,
                e.tolerance);
    ++g_failures;
  }
}

void run_rope(const Case& c) {
  const Array &q = c.inputs.at("q"), &k = c.inputs.at("k");
  const dpe::DType dt = dtype_of(c.dtype);
  const int64_t T = q.shape[0], hq = q.shape[1], d = q.shape[2], hk = k.shape[1];
  const auto mit = c.inputs.find("mask");
  const bool has_mask = mit != c.inputs.end();
  const int64_t hks = has_mask ? mit->second.shape[0] : hk;
  const size_t es = elem_size(dt);
  std::vector<char> qn(T * hq * d * es), kn(T * hk * d * es), qs(T * hq * d * es), ks(T * hks * d * es);

  dpe::RopeParams p;
  p.q = q.bytes.data();
  p.q_strides = {0, hq * d, d};
  p.k = k.bytes.data();
  p.k_strides = {0, hk * d, d};
  p.positions = c.inputs.at("positions").bytes.data();
  p.pos_stride_batch = 0;
  p.pos_stride_token = 1;
  p.inv_freq = c.inputs.at("inv_freq").as<float>();
  p.pair_scale = c.inputs.at("pair_scale").as<int64_t>();
  p.mask = has_mask ? mit->second.as<uint8_t>() : nullptr;
  p.mask_heads = has_mask ? hks : 0;
  p.q_normal = qn.data();
  p.q_normal_strides = {0, hq * d, d};
  p.k_normal = kn.data();
  p.k_normal_strides = {0, hk * d, d};
  p.q_scaled = qs.data();
  p.q_scaled_strides = {0, hq * d, d};
  p.k_scaled = ks.data();
  p.k_scaled_strides = {0, hks * d, d};
  p.batch = 1;
  p.seqlen = T;
  p.heads_q = hq;
  p.heads_k = hk;
  p.head_dim = d;
  p.rotary_dim = c.param("rotary_dim");
  p.window = c.param("window");
  p.dtype = dt;
  p.pos_type = c.inputs.at("positions").dtype == "int32" ? dpe::IndexType::kInt32 : dpe::IndexType::kInt64;
  p.layout = c.params.at("layout").at(0) == "gptj" ? dpe::Layout::kGptj : dpe::Layout::kNeox;
  const dpe::Status st = dpe::rope_cpu(p, 0);
  if (!st.ok()) {
    std::printf("FAIL %s: rope_cpu returned %s (%s)\n", c.name.c_str(), dpe::error_code_name(st.code), st.message);
    ++g_failures;
    return;
  }
  const std::pair<const char*, const std::vector<char>*> outs[] = {
      {"q_normal", &qn}, {"k_normal", &kn}, {"q_scaled", &qs}, {"k_scaled", &ks}};
  for (const auto& o : outs) {
    const std::vector<char>& buf = *o.second;
    compare(c, o.first, static_cast<int64_t>(buf.size() / es),
            [&](int64_t i) { return to_double(buf.data() + i * es, dt); });
  }
}

void run_paged(const Case& c) {
  const Array &qn = c.inputs.at("q_normal"), &kc = c.inputs.at("k_cache"), &ksc = c.inputs.at("ks_cache"),
              &vc = c.inputs.at("v_cache"), &bt = c.inputs.at("block_table"), &sl = c.inputs.at("seq_lens");
  const int64_t B = sl.shape[0];
  if (qn.shape[0] != B || bt.dtype != "int32" || sl.dtype != "int32") {  // not one query per sequence
    ++g_skipped;
    return;
  }
  const int64_t hq = qn.shape[1], d = qn.shape[2], nb = kc.shape[0], bs = kc.shape[1], hk = kc.shape[2];
  const int64_t hks = ksc.shape[2], dv = vc.shape[3];
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, sl.as<int32_t>()[b]);
  std::vector<float> out(B * hq * dv), lse(B * hq);
  dpe::PagedDecodeParams p;
  p.q_normal = qn.bytes.data();
  p.qn_strides = {hq * d, d};
  p.q_scaled = c.inputs.at("q_scaled").bytes.data();
  p.qs_strides = {hq * d, d};
  p.k_cache = kc.bytes.data();
  p.k_strides = {bs * hk * d, hk * d, d};
  p.ks_cache = ksc.bytes.data();
  p.ks_strides = {bs * hks * d, hks * d, d};
  p.v_cache = vc.bytes.data();
  p.v_strides = {bs * hk * dv, hk * dv, dv};
  p.block_table = bt.bytes.data();
  p.block_table_stride = bt.shape[1];
  p.max_blocks = bt.shape[1];
  p.seq_lens = sl.bytes.data();
  p.out = out.data();
  p.lse = lse.data();
  p.batch = B;
  p.heads_q = hq;
  p.heads_k = hk;
  p.heads_ks = hks;
  p.head_dim = d;
  p.v_head_dim = dv;
  p.num_blocks = nb;
  p.block_size = bs;
  p.window = c.param("window");
  p.max_seqlen_k = max_len;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));  // the ops' default softmax scale
  p.dtype = dtype_of(c.dtype);
  p.index_type = dpe::IndexType::kInt32;
  const dpe::Status st = dpe::paged_decode_cpu(p, 0);
  if (!st.ok()) {
    std::printf("FAIL %s: paged_decode_cpu returned %s (%s)\n", c.name.c_str(), dpe::error_code_name(st.code),
                st.message);
    ++g_failures;
    return;
  }
  compare(c, "out", static_cast<int64_t>(out.size()), [&](int64_t i) { return static_cast<double>(out[i]); });
  compare(c, "lse", static_cast<int64_t>(lse.size()), [&](int64_t i) { return static_cast<double>(lse[i]); });
}

bool parse_array(std::istringstream& ls, Array& a, bool expected) {
  if (!expected) ls >> a.dtype;
  ls >> a.file;
  if (expected) {
    a.dtype = "float64";
    ls >> a.tolerance;
  }
  int64_t nd = 0;
  ls >> nd;
  a.shape.resize(static_cast<size_t>(nd));
  for (auto& s : a.shape) ls >> s;
  return static_cast<bool>(ls);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : DPE_GOLDEN_DIR;
  std::ifstream mf(dir + "/manifest.txt");
  if (!mf) {
    std::printf("FAIL: cannot open %s/manifest.txt\n", dir.c_str());
    return 1;
  }
  std::string line, word;
  std::getline(mf, line);
  if (line != "dpe-golden 1") {
    std::printf("FAIL: %s/manifest.txt starts with '%s', this test reads 'dpe-golden 1'\n", dir.c_str(),
                line.c_str());
    return 1;
  }
  Case c;
  while (std::getline(mf, line)) {
    std::istringstream ls(line);
    ls >> word;
    if (word == "case") {
      c = Case();
      ls >> c.name >> c.op >> c.dtype;
    } else if (word == "param") {
      std::string key, v;
      ls >> key;
      while (ls >> v) c.params[key].push_back(v);
    } else if (word == "input" || word == "expected") {
      std::string name;
      ls >> name;
      Array a;
      const bool exp = word == "expected";
      if (!parse_array(ls, a, exp) || !read_file(dir + "/" + a.file, a.bytes)) {
        std::printf("FAIL %s: bad line or unreadable file: %s\n", c.name.c_str(), line.c_str());
        ++g_failures;
        continue;
      }
      (exp ? c.expected : c.inputs)[name] = std::move(a);
    } else if (word == "end") {
      if (c.op == "rope") {
        ++g_cases;
        run_rope(c);
      } else if (c.op == "paged") {
        ++g_cases;
        run_paged(c);
      } else {
        ++g_skipped;
      }
    }
  }
  std::printf("%d golden cases checked, %d skipped (no CPU kernel here), %d failures\n", g_cases, g_skipped,
              g_failures);
  return (g_failures == 0 && g_cases > 0) ? 0 : 1;
}
