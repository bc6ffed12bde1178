// Shared by every kernel header of dpe/: the public types (dtype, index type,
// pair layout, error codes and Status, stride blocks), and, for host code, the
// 16-bit storage types of the CPU kernels and the CPU-feature detection that
// picks their compiled bodies. Torch-free; includes nothing of dpe/.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DPE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPE_HOST_DEVICE inline
#endif

namespace dpe {

// ===========================================================================
// Public types
// ===========================================================================

/// Element type of q, k, v and every rotated output / cache (all the same).
enum class DType : int32_t {
  kFloat32 = 0,   ///< IEEE float32
  kFloat16 = 1,   ///< IEEE binary16 (c10::Half, __half, _Float16 bits)
  kBFloat16 = 2,  ///< bfloat16 (c10::BFloat16, __nv_bfloat16 bits)
};

/// Integer type of the positions array.
enum class IndexType : int32_t {
  kInt32 = 0,
  kInt64 = 1,
};

/// Pair layout inside a head vector of rotary dimension R = 2P.
enum class Layout : int32_t {
  kNeox = 0,  ///< rotate_half (Llama/HF): pair i is (x[i], x[i + P])
  kGptj = 1,  ///< interleaved: pair i is (x[2i], x[2i + 1])
};

/// Error codes of the entry points. kOk is zero.
enum class ErrorCode : int32_t {
  kOk = 0,
  kNullPointer,       ///< a required pointer is null
  kInvalidShape,      ///< a size is negative / zero where it must be positive
  kInvalidHeads,      ///< H_q is not a positive multiple of H_k
  kInvalidRotaryDim,  ///< rotary_dim is odd, < 2 or > head_dim
  kInvalidWindow,     ///< window < 1
  kInvalidMask,       ///< mask_heads is not H_q or H_k
  kInvalidStride,     ///< a stride is negative
  kInvalidAlias,      ///< outputs alias inputs other than the allowed in-place mode
  kInvalidEnum,       ///< dtype / pos_type / layout out of range
  kInvalidValue,      ///< a value read from host memory is out of range (CPU entry points)
  kLaunchError,       ///< the CUDA launch failed (message: cudaGetErrorString)
};

/// Result of an entry point: a code and a static, NUL-terminated message that
/// names the offending argument ("" on success). The message is never freed.
struct Status {
  ErrorCode code = ErrorCode::kOk;
  const char* message = "";
  DPE_HOST_DEVICE bool ok() const { return code == ErrorCode::kOk; }
};

DPE_HOST_DEVICE Status ok_status() { return Status{ErrorCode::kOk, ""}; }
DPE_HOST_DEVICE Status error(ErrorCode code, const char* message) { return Status{code, message}; }

/// Name of an error code ("kInvalidStride"), for logs.
inline const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk: return "kOk";
    case ErrorCode::kNullPointer: return "kNullPointer";
    case ErrorCode::kInvalidShape: return "kInvalidShape";
    case ErrorCode::kInvalidHeads: return "kInvalidHeads";
    case ErrorCode::kInvalidRotaryDim: return "kInvalidRotaryDim";
    case ErrorCode::kInvalidWindow: return "kInvalidWindow";
    case ErrorCode::kInvalidMask: return "kInvalidMask";
    case ErrorCode::kInvalidStride: return "kInvalidStride";
    case ErrorCode::kInvalidAlias: return "kInvalidAlias";
    case ErrorCode::kInvalidEnum: return "kInvalidEnum";
    case ErrorCode::kInvalidValue: return "kInvalidValue";
    case ErrorCode::kLaunchError: return "kLaunchError";
  }
  return "unknown";
}

/// Strides (elements) of a [B, S, H, D] tensor, or of a [T, H, D] tensor with
/// batch = 0 (then B = 1, S = T). The head_dim stride is 1.
struct RowStrides {
  int64_t batch = 0;  ///< between sequences of the batch
  int64_t token = 0;  ///< between consecutive tokens of one sequence
  int64_t head = 0;   ///< between heads of one token
};

/// Strides (elements) of a token-major [T, H, D] tensor. The head_dim stride is 1.
struct TokenStrides {
  int64_t token = 0;  ///< between tokens
  int64_t head = 0;   ///< between heads of one token
};

/// Strides (elements) of a paged cache [num_blocks, block_size, H, D]. The
/// head_dim stride is 1.
struct CacheStrides {
  int64_t block = 0;  ///< between blocks
  int64_t slot = 0;   ///< between slots (tokens) of one block
  int64_t head = 0;   ///< between heads of one slot
};

}  // namespace dpe

// ===========================================================================
// Host CPU kernels only (never seen by nvcc): 16-bit storage, CPU features
// ===========================================================================
#if !defined(__CUDACC__) && !defined(__HIPCC__)

#if defined(__GNUC__)
#define DPE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DPE_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define DPE_HAVE_AVX2_PATH 1  // the AVX2 / AVX-512 bodies are compiled (target attributes)
#endif

namespace dpe {

DPE_ALWAYS_INLINE uint64_t double_bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
DPE_ALWAYS_INLINE double bits_double(uint64_t u) {
  double v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

DPE_ALWAYS_INLINE uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
DPE_ALWAYS_INLINE float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// bfloat16 storage for the CPU kernel: the same 16 bits as c10::BFloat16,
// with branch-free conversions (round to nearest even; NaN -> 0x7FC0 as c10
// does) so the per-pair loop stays vectorised; c10's float -> bfloat16 has a
// NaN branch that keeps GCC from vectorising the whole rotation loop.
struct bf16_storage {
  uint16_t bits;
  bf16_storage() = default;
  DPE_ALWAYS_INLINE explicit bf16_storage(float v) {
    const uint32_t u = float_bits(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t is_nan = 0u - static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
    bits = static_cast<uint16_t>((rounded & ~is_nan) | (0x7FC0u & is_nan));
  }
  DPE_ALWAYS_INLINE explicit operator float() const {
    return bits_float(static_cast<uint32_t>(bits) << 16);
  }
};
static_assert(sizeof(bf16_storage) == 2, "bfloat16 storage is 16 bits");

// IEEE binary16 storage for compilers without _Float16: round-to-nearest-even
// conversions written from the format's definition. Branchy (so the
// rotation loop does not vectorise for float16 on such compilers), correct
// for every value: normals, subnormals, overflow to inf, inf and NaN.
struct half_storage {
  uint16_t bits;
  half_storage() = default;
  explicit half_storage(float v) {
    const uint32_t u = float_bits(v);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) {  // inf, NaN (quiet)
      bits = static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
    } else if (a >= 0x477FF000u) {  // >= 65520 rounds to inf
      bits = static_cast<uint16_t>(sign | 0x7C00u);
    } else if (a < 0x38800000u) {  // below 2^-14: half subnormal or zero
      // |v| + 0.5 has ulp 2^-24, the half subnormal step: the float add rounds
      // to nearest even at exactly that step; its mantissa is the result.
      const float r = bits_float(a) + 0.5f;
      bits = static_cast<uint16_t>(sign | (float_bits(r) - 0x3F000000u));
    } else {  // normal: rebias the exponent, round the 13 dropped bits to even
      const uint32_t odd = (a >> 13) & 1u;
      const uint32_t r = a - (static_cast<uint32_t>(127 - 15) << 23) + 0xFFFu + odd;
      bits = static_cast<uint16_t>(sign | (r >> 13));
    }
  }
  explicit operator float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t em = bits & 0x7FFFu;
    if (em >= 0x7C00u) return bits_float(sign | 0x7F800000u | ((em & 0x3FFu) << 13));
    if (em >= 0x0400u) return bits_float(sign | ((em << 13) + (static_cast<uint32_t>(127 - 15) << 23)));
    const float mag = static_cast<float>(em) * 0x1p-24f;  // subnormal: em * 2^-24, exact
    return bits_float(sign | float_bits(mag));
  }
};
static_assert(sizeof(half_storage) == 2, "float16 storage is 16 bits");

// Element type the CPU kernel computes on for each DType (same bits as the
// caller's tensors).
template <DType T>
struct CpuScalar;
template <>
struct CpuScalar<DType::kFloat32> {
  using type = float;
};
template <>
struct CpuScalar<DType::kFloat16> {
#if defined(__FLT16_MAX__)
  using type = _Float16;  // F16C conversions in the AVX2/AVX-512 builds vectorise
#else
  using type = half_storage;
#endif
};
template <>
struct CpuScalar<DType::kBFloat16> {
  using type = bf16_storage;
};
static_assert(sizeof(CpuScalar<DType::kFloat16>::type) == 2, "float16 is 16 bits");

#ifdef DPE_HAVE_AVX2_PATH
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

inline bool cpu_has_avx512bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

/// The compiled bodies of the CPU kernel. kAuto (the default) runs the best
/// one this CPU supports; the others exist to test and benchmark each body.
enum class CpuIsa : int32_t { kAuto = 0, kBaseline = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4 };

/// True when this build and CPU can run `isa` (kAuto and kBaseline always).
inline bool cpu_isa_supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto:
    case CpuIsa::kBaseline: return true;
#ifdef DPE_HAVE_AVX2_PATH
    case CpuIsa::kAvx2: return cpu_has_avx2();
    case CpuIsa::kAvx512: return cpu_has_avx512();
    case CpuIsa::kAvx512Bf16: return cpu_has_avx512bf16();
#else
    case CpuIsa::kAvx2:
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16: return false;
#endif
  }
  return false;
}

namespace detail {
inline CpuIsa& forced_cpu_isa() {
  static CpuIsa isa = CpuIsa::kAuto;
  return isa;
}
}  // namespace detail

/// Force one body for every later call in this process (tests, benchmarks).
/// Returns false, changing nothing, when cpu_isa_supported(isa) is false.
/// Not synchronised: call it while no kernel runs.
inline bool set_cpu_isa(CpuIsa isa) {
  if (!cpu_isa_supported(isa)) return false;
  detail::forced_cpu_isa() = isa;
  return true;
}

/// The body the next call runs (never kAuto).
inline CpuIsa active_cpu_isa() {
  const CpuIsa forced = detail::forced_cpu_isa();
  if (forced != CpuIsa::kAuto) return forced;
#ifdef DPE_HAVE_AVX2_PATH
  if (cpu_has_avx512bf16()) return CpuIsa::kAvx512Bf16;
  if (cpu_has_avx512()) return CpuIsa::kAvx512;
  if (cpu_has_avx2()) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

}  // namespace dpe

#endif  // host CPU kernels
