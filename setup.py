"""Build of lora_kernels.

Pure-Python package (torch + Triton backends) everywhere; plus the CUDA/C++ extension ``lora_kernels._C``
(csrc/*.cu + csrc/binding.cpp: cuBLAS via ATen + fused LoRA kernels) when torch has CUDA, nvcc is found and
LORA_KERNELS_SKIP_CUDA_BUILD != "1".

Build with the torch you will run with (build isolation would pull a fresh torch from the index):
    pip wheel --no-build-isolation --no-deps -w dist .      # or: python setup.py bdist_wheel
Environment: LORA_KERNELS_CUDA_ARCHS (default "80;90", PTX added for the newest), MAX_JOBS (ninja jobs),
LORA_KERNELS_SKIP_CUDA_BUILD=1 (pure-Python install).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

BASE_VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_reason() -> str | None:
    """None when the CUDA extension should be built, else why not."""
    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return "LORA_KERNELS_SKIP_CUDA_BUILD=1"
    try:
        import torch
    except ImportError:
        return "torch is not importable at build time (use pip --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc / CUDA_HOME not found"
    return None


CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"  # header-only CUTLASS/CuTe for the sm_90 GEMM (csrc/gemm_sm90.cuh)


def _cutlass_dirs() -> list[str] | None:
    """Include dirs of the CUTLASS headers: $LORA_KERNELS_CUTLASS_DIR (a CUTLASS checkout or the wheel's
    cutlass_library/source), else the installed nvidia-cutlass wheel; None when neither has them."""
    import importlib.util

    roots = []
    if os.environ.get("LORA_KERNELS_CUTLASS_DIR"):
        roots.append(os.environ["LORA_KERNELS_CUTLASS_DIR"])
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.append(os.path.join(list(spec.submodule_search_locations)[0], "source"))
    for root in roots:
        if os.path.exists(os.path.join(root, "include", "cute", "tensor.hpp")):
            return [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    return None


def _gencode_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("LORA_KERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    # sm_90 machine code is built as sm_90a: the Hopper GEMM needs wgmma/setmaxnreg, and 90a code runs on every
    # compute-capability-9.0 GPU. The PTX for newer GPUs stays plain compute_XX.
    flags = [f"-gencode=arch=compute_{a}a,code=sm_{a}a" if a == "90" else f"-gencode=arch=compute_{a},code=sm_{a}"
             for a in archs]
    newest = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for newer GPUs
    return flags


ext_modules = []
cmdclass = {}
version = BASE_VERSION
reason = _cuda_build_reason()
if reason is None:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + [os.path.join("csrc", "binding.cpp")]
    cutlass = _cutlass_dirs()
    sm90_flags = ["-DLORA_KERNELS_HAVE_SM90_GEMM=1"] if cutlass else []
    if cutlass is None:
        print(f"lora_kernels: CUTLASS headers not found ({CUTLASS_PIN} or LORA_KERNELS_CUTLASS_DIR): building "
              "without the sm_90 GEMM (Hopper GPUs then use the cuBLAS path)", file=sys.stderr)
    ext_modules.append(
        CUDAExtension(
            name="lora_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")] + (cutlass or []),
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17"] + sm90_flags,
                # NDEBUG: CUTLASS's device-side asserts are function calls, which make ptxas serialize the
                # wgmma pipeline of the sm_90 GEMM (warning C7510).
                "nvcc": ["-O3", "-std=c++17", "-lineinfo", "-DNDEBUG", "--expt-relaxed-constexpr"] + sm90_flags
                + _gencode_flags(),
            },
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    cu = torch.version.cuda.split(".")
    tv = torch.__version__.split("+")[0].split(".")
    version = f"{BASE_VERSION}+cu{cu[0]}{cu[1]}torch{tv[0]}.{tv[1]}"
    print(f"lora_kernels: building the CUDA extension lora_kernels._C (version {version})", file=sys.stderr)
else:
    print(
        f"lora_kernels: NOT building the CUDA extension ({reason}); installing the pure-Python package "
        "(torch + Triton backends).",
        file=sys.stderr,
    )

setup(
    name="lora_kernels",
    version=version,
    description="Fused LoRA linear layer: torch reference, Triton and CUDA backends",
    packages=find_packages(exclude=("tests", "tests.*", "bench", "bench.*")),
    python_requires=">=3.9",
    install_requires=["torch"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
