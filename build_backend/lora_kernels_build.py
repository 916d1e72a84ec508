"""PEP 517 build backend of lora_kernels: setuptools' own, run with the torch of the environment being installed into.

The CUDA extension must be compiled against the torch it will run with. With build isolation (pip's default) the
build runs in a temporary environment that holds only the build requirements. torch is deliberately not one of
them: pip would put a torch from the index there (another version, another CUDA, or a CUDA build on a machine
that has none), and the extension would be built for that torch instead of the installed one.

So, when torch is not importable in the build environment, this backend asks the interpreter that runs the build,
without pip's isolation settings, where its torch lies, and appends that site-packages folder to ``sys.path``
(after the build environment's own folders, so setuptools still comes from the build environment). setup.py then
sees the installed torch. When there is no torch to find (a fresh environment: pip installs torch only after the
build), setup.py installs the pure-Python package and records why (``lora_kernels/_build_info.py``), which
``python -m lora_kernels`` and ``lora_kernels.backend_status()`` report.

``pip install --no-build-isolation .`` skips all this: setup.py imports the environment's torch directly.
"""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks)

_PROBE = "import os, torch; print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))"


def _installed_torch_dir() -> str | None:
    """The site-packages folder holding the target environment's torch, or None when it has none."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # PYTHONPATH carries pip's isolation
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.TimeoutExpired):
        return None
    folder = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    return folder if os.path.isdir(os.path.join(folder, "torch")) else None


def _use_installed_torch() -> None:
    try:
        import torch  # noqa: F401  (no isolation: the environment's own torch)
        return
    except ImportError:
        pass
    folder = _installed_torch_dir()
    if folder is not None and folder not in sys.path:
        sys.path.append(folder)
        os.environ["LORA_KERNELS_TORCH_FROM"] = folder  # for setup.py's message


_use_installed_torch()


_CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"  # setup.py's CUTLASS_PIN: the headers of the sm_90 GEMM


def _cutlass_requirement() -> list[str]:
    """The CUTLASS headers' wheel, when this build compiles the CUDA extension and finds no headers already
    (LORA_KERNELS_CUTLASS_DIR or an installed nvidia-cutlass). Asked only then: the wheel pulls in cuda-python and
    scipy, which a pure-Python install does not need."""
    import importlib.util

    if os.environ.get("LORA_KERNELS_SKIP_CUDA_BUILD", "0") == "1" or os.environ.get("LORA_KERNELS_CUTLASS_DIR"):
        return []
    if importlib.util.find_spec("cutlass_library") is not None:
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return []
    if torch.version.cuda is None or CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return []
    return [_CUTLASS_PIN]


def get_requires_for_build_wheel(config_settings=None):
    from setuptools import build_meta

    return build_meta.get_requires_for_build_wheel(config_settings) + _cutlass_requirement()


def get_requires_for_build_editable(config_settings=None):
    from setuptools import build_meta

    return build_meta.get_requires_for_build_editable(config_settings) + _cutlass_requirement()
