// Torch-free compile check of the CUDA kernel header (.ci/compile_cuda.sh and
// the CMake build when nvcc is found).
//
// Includes only dpe/rope_cuda.cuh and instantiates both entry points, which
// dispatch to every (dtype, position type, layout) kernel, so the header is
// proven to build with no torch header on the include path. Compiled with
// `nvcc -c` only; never linked or run.
#include <cuda_runtime.h>

#include "dpe/rope_cuda.cuh"

namespace dpe_compile_check {

dpe::Status rope(const dpe::RopeParams& p, cudaStream_t stream) { return dpe::rope_cuda(p, stream); }

dpe::Status rope_and_cache(const dpe::RopeCacheParams& p, cudaStream_t stream) {
  return dpe::rope_and_cache_cuda(p, stream);
}

}  // namespace dpe_compile_check
