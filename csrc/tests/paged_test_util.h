// Helpers shared by the paged decode ctests (test_paged_decode_cpu.cpp,
// test_paged_decode_rotary_cpu.cpp): the CHECK counter and a tensor of random
// normal values stored in float32 / float16 / bfloat16.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "dpe/common.h"

namespace dpe_test {

inline int g_checks = 0, g_failures = 0;

inline uint16_t to_bits(float v, dpe::DType dt) {
  if (dt == dpe::DType::kBFloat16) return dpe::bf16_storage(v).bits;
  dpe::CpuScalar<dpe::DType::kFloat16>::type h(v);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline float from_bits(uint16_t u, dpe::DType dt) {
  if (dt == dpe::DType::kBFloat16) {
    dpe::bf16_storage b;
    b.bits = u;
    return static_cast<float>(b);
  }
  dpe::CpuScalar<dpe::DType::kFloat16>::type h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}

// A tensor of float values stored in dtype dt (4 or 2 bytes per element); f
// holds the stored values as floats (what a reference must read).
struct Store {
  dpe::DType dt;
  std::vector<float> f;
  std::vector<uint16_t> h;
  Store(size_t n, dpe::DType t, std::mt19937& g) : dt(t), f(n) {
    std::normal_distribution<float> nd;
    for (auto& x : f) x = nd(g);
    if (dt != dpe::DType::kFloat32) {
      h.resize(n);
      for (size_t i = 0; i < n; ++i) {
        h[i] = to_bits(f[i], dt);
        f[i] = from_bits(h[i], dt);  // the reference reads the stored value
      }
    }
  }
  const void* ptr(size_t off = 0) const {
    return dt == dpe::DType::kFloat32 ? static_cast<const void*>(f.data() + off)
                                      : static_cast<const void*>(h.data() + off);
  }
};

}  // namespace dpe_test

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++dpe_test::g_checks;                                  \
    if (!(cond)) {                                         \
      ++dpe_test::g_failures;                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)
