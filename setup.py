"""Builds one extension, channelconv._C: the CPU kernels always, the CUDA kernels when a CUDA
build of torch and the CUDA toolkit are present (or FORCE_CUDA=1; FORCE_CUDA=0 forces a CPU build).

Install against the torch already in the environment:  pip install --no-build-isolation -e .
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # OpenMP: ATen's parallel_for is an inline OpenMP region; without -fopenmp it runs serially.
    cxx = ["-O3", "-fopenmp"]
    extra = {}
    if os.environ.get("CHANNELCONV_SANITIZE"):  # e.g. address,undefined (see .ci/run)
        flag = f"-fsanitize={os.environ['CHANNELCONV_SANITIZE']}"
        cxx += [flag, "-fno-omit-frame-pointer", "-O1"]
        extra["extra_link_args"] = [flag]
    if not want_cuda():
        return CppExtension("channelconv._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"] + extra.get("extra_link_args", []))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    if os.environ.get("CHANNELCONV_PTXAS_INFO") == "1":  # registers, spills, shared memory per kernel (CI)
        nvcc += ["-Xptxas", "-v"]
    return CUDAExtension("channelconv._C", sources,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"] + extra.get("extra_link_args", []))


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
