// The Python module dpe_kernels._C: importing it loads this shared library, whose
// torch launchers (rope.cpp, paged_decode.cpp, rope_cuda.cu) register the kernels
// of the ops that dpe_kernels/ops.py defines. It holds no op itself.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpe_kernels compiled ops (registered in torch.ops.dpe_kernels)";
}
