"""The torch binding of the CUDA backend (csrc/binding.cpp) compiles against this torch's headers, and against the
headers in $LORA_KERNELS_NEWEST_TORCH_INCLUDE (CI sets it to the newest torch release's: .ci/newest_torch_headers.sh):
a syntax-only build with the host compiler, no GPU and no CUDA torch needed, with the C++ standard setup.py picks
for those headers. The CPU torch wheel ships the ATen and c10/cuda headers but not the CUDA build's generated
c10/cuda/impl/cuda_cmake_macros.h, which the test stands in for with an empty file; the CUDA runtime headers come
from nvcc's toolkit. The GPU build (setup.py) compiles it for real."""
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_ext

from conftest import nvcc_or_skip, torch_cxx_std

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include(nvcc):
    """The toolkit's include folder, as nvcc itself reports it (nvcc may be a wrapper script)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    dirs = re.findall(r'INCLUDES="-I([^"]+)"', out.stdout + out.stderr)
    dirs.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    return next((d.strip() for d in dirs if os.path.exists(os.path.join(d.strip(), "cuda_runtime_api.h"))), None)


NEWEST_ENV = "LORA_KERNELS_NEWEST_TORCH_INCLUDE"


def _headers(which):
    """Include folders of the torch headers to check against."""
    if which == "installed":
        return cpp_ext.include_paths()
    root = os.environ.get(NEWEST_ENV)
    if not root:
        pytest.skip(f"{NEWEST_ENV} is not set (CI sets it: .ci/newest_torch_headers.sh)")
    return [root, os.path.join(root, "torch", "csrc", "api", "include")]


@pytest.mark.parametrize("which", ["installed", "newest"])
def test_binding_compiles(tmp_path, which):
    torch_includes = _headers(which)
    nvcc = nvcc_or_skip()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = _cuda_include(nvcc)
    if cuda_include is None:
        pytest.skip(f"no CUDA runtime headers found through {nvcc}")
    if not os.path.exists(os.path.join(torch_includes[0], "c10", "cuda", "CUDAStream.h")):
        pytest.skip("this torch ships no c10/cuda headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in torch_includes):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    std = torch_cxx_std(torch_includes[0])  # the standard setup.py builds with for these headers
    cmd = [cxx, f"-std={std}", "-fsyntax-only", "-Wall", "-Wno-unused-function", f"-I{tmp_path}",
           *[f"-I{d}" for d in torch_includes], f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(ROOT, "csrc", "binding.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert out.returncode == 0 and not errors, out.stderr[-5000:]
