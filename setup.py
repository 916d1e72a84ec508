"""Build of lora_kernels.

Pure-Python package (torch + Triton backends) everywhere; plus the CUDA/C++ extension ``lora_kernels._C``
(csrc/*.cu + csrc/binding.cpp: cuBLAS via ATen + fused LoRA kernels) when the installed torch has CUDA, nvcc and
the CUDA runtime headers are found, and LORA_KERNELS_SKIP_CUDA_BUILD != "1".

The extension is compiled against the torch installed in the target environment: ``pip install .`` does that
through the in-tree build backend (build_backend/lora_kernels_build.py); ``pip install --no-build-isolation .`` and
``pip wheel --no-build-isolation --no-deps -w dist .`` import that torch directly. What was built, against which
torch and CUDA (or why nothing was), is written to lora_kernels/_build_info.py; at import lora_kernels compares it
with the running torch (lora_kernels/_extension.py).
Environment: LORA_KERNELS_CUDA_ARCHS (default "80;90", PTX added for the newest), MAX_JOBS (ninja jobs),
LORA_KERNELS_SKIP_CUDA_BUILD=1 (pure-Python install).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

BASE_VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "lora_kernels", "_build_info.py")


def _nvcc_release(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version`, or None."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_build_reason() -> str | None:
    """None when the CUDA extension should be built, else why not."""
    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return "LORA_KERNELS_SKIP_CUDA_BUILD=1"
    try:
        import torch
    except ImportError:
        return ("torch was not installed when lora_kernels was built; to build the extension, install torch first, "
                "then run `pip install .` again")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    if CUDA_HOME is None or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME or put nvcc on the PATH)"
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        return f"the CUDA toolkit at {CUDA_HOME} has no cuda_runtime_api.h (a minimal toolkit)"
    release = _nvcc_release(nvcc)
    if release is None or release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"nvcc {release} ({nvcc}) does not match torch's CUDA {torch.version.cuda}"
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


def _cxx_std(torch_include: str) -> str:
    """The C++ standard the torch headers require: C++20 where ATen.h demands it (torch >= 2.14), else C++17."""
    try:
        with open(os.path.join(torch_include, "ATen", "ATen.h")) as f:
            return "c++20" if "C++20 or later" in f.read() else "c++17"
    except OSError:
        return "c++17"


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


def _write_build_info(built: bool, reason: str | None) -> None:
    """lora_kernels/_build_info.py: what the extension was built against, compared with the running torch at import."""
    torch_version = cuda_version = None
    try:
        import torch

        torch_version, cuda_version = torch.__version__, torch.version.cuda
    except ImportError:
        pass
    with open(BUILD_INFO, "w") as f:
        f.write("# Generated by setup.py when lora_kernels was built; read by lora_kernels/_extension.py.\n")
        f.write(f"CUDA_EXTENSION_BUILT = {built!r}\n")
        f.write(f"NOT_BUILT_REASON = {reason!r}\n")
        f.write(f"TORCH_VERSION = {torch_version!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {cuda_version!r}\n")


ext_modules = []
cmdclass = {}
version = BASE_VERSION
reason = _cuda_build_reason()
if reason is None:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension, include_paths

    std = _cxx_std(include_paths()[0])
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
                "cxx": ["-O3", f"-std={std}"] + sm90_flags,
                # NDEBUG: CUTLASS's device-side asserts are function calls, which make ptxas serialize the
                # wgmma pipeline of the sm_90 GEMM (warning C7510).
                "nvcc": ["-O3", f"-std={std}", "-lineinfo", "-DNDEBUG", "--expt-relaxed-constexpr"] + sm90_flags
                + _gencode_flags(),
            },
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    cu = torch.version.cuda.split(".")
    tv = torch.__version__.split("+")[0].split(".")
    version = f"{BASE_VERSION}+cu{cu[0]}{cu[1]}torch{tv[0]}.{tv[1]}"
    where = os.environ.get("LORA_KERNELS_TORCH_FROM")
    print(f"lora_kernels: building the CUDA extension lora_kernels._C (version {version}, -std={std}) against "
          f"torch {torch.__version__}" + (f" from {where}" if where else ""), file=sys.stderr)
else:
    print(
        f"lora_kernels: NOT building the CUDA extension ({reason}); installing the pure-Python package "
        "(torch + Triton backends). `python -m lora_kernels` reports this too.",
        file=sys.stderr,
    )
_write_build_info(reason is None, reason)

setup(
    name="lora_kernels",
    version=version,
    description="Fused LoRA linear layer: torch reference, Triton and CUDA backends",
    packages=find_packages(exclude=("tests", "tests.*", "bench", "bench.*", "build_backend", "build_backend.*")),
    python_requires=">=3.9",
    install_requires=["torch"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
