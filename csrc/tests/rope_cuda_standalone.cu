// Torch-free compile check of the CUDA kernel header (.ci/compile_cuda.sh).
//
// Includes only dpe/rope_cuda.cuh and instantiates dpe::launch_rope_cuda for
// every (scalar_t, pos_t) pair the launcher (csrc/rope_cuda.cu) dispatches, so the
// kernel header is proven to build with no torch header on the include path.
// Compiled with `nvcc -c` only; never linked or run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dpe/rope_cuda.cuh"

namespace dpe {

template cudaError_t launch_rope_cuda<float, int32_t>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope_cuda<float, int64_t>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope_cuda<__half, int32_t>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope_cuda<__half, int64_t>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope_cuda<__nv_bfloat16, int32_t>(const RopeParams&, cudaStream_t);
template cudaError_t launch_rope_cuda<__nv_bfloat16, int64_t>(const RopeParams&, cudaStream_t);

}  // namespace dpe
