"""lora_kernels/_config.py: every environment variable is documented there, and each is read when it says."""
import os
import re
import subprocess
import sys

import pytest

import lora_kernels
from lora_kernels import _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("lora_kernels", "csrc", "bench", "tests", "build_backend", ".ci", "setup.py")
NOT_SETTINGS = {"LORA_KERNELS_HAVE_SM90_GEMM",  # a preprocessor macro that setup.py defines
                "LORA_KERNELS_GEMM_SM90_INSTANCE",  # the macro that writes one sm_90 GEMM instance
                "LORA_KERNELS_FUSED_SM90_INSTANCE",  # the macro that writes one fused-forward instance
                "LORA_KERNELS_FUSED_SM90_SPLIT_INSTANCE",  # ... and one of its split variant
                "LORA_KERNELS_PROBE_NO_GDC",  # a macro of bench/dev's stream-K GEMM probe (csrc/gemm_sm90.cuh)
                "LORA_KERNELS_NO_DEVICE_SMEM_PER_BLOCK"}  # a macro the host tests of csrc/plans.cu define


def _source_files():
    for top in SOURCES:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield path
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ("results", "__pycache__")]
            for name in files:
                if name.endswith((".py", ".sh", ".cpp", ".h", ".cu", ".cuh")):
                    yield os.path.join(folder, name)


def test_every_setting_is_documented():
    names = set()
    for path in _source_files():
        with open(path, errors="replace") as f:
            names |= set(re.findall(r"\bLORA_KERNELS_[A-Z0-9_]+\b", f.read()))
    documented = set(re.findall(r"\bLORA_KERNELS_[A-Z0-9_]+\b", _config.__doc__)) | {"TRITON_INTERPRET"}
    assert names - NOT_SETTINGS <= documented, sorted(names - NOT_SETTINGS - documented)
    assert "TRITON_INTERPRET" in _config.__doc__ and "MAX_JOBS" in _config.__doc__


def test_package_reads_the_environment_only_in_config():
    """Inside lora_kernels/, only _config.py looks at os.environ, except two modules that still read a variable of
    _config's themselves: dora_kernels.py TRITON_INTERPRET (per call), cuda_backend.py LORA_KERNELS_CPP_AUTOGRAD (at
    its import; ops.py checks _config.CPP_AUTOGRAD as well)."""
    readers = []
    for folder, _, files in os.walk(os.path.join(ROOT, "lora_kernels")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "_config.py":
                with open(path) as f:
                    if re.search(r"os\.environ|os\.getenv|getenv\(", f.read()):
                        readers.append(os.path.relpath(path, ROOT))
    known = {os.path.join("lora_kernels", "dora_kernels.py"),
             os.path.join("lora_kernels", "backends", "cuda_backend.py")}
    assert set(readers) <= known, readers


def test_per_call_settings_follow_the_environment(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    assert _config.backend() is None
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert _config.backend() == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "")
    assert _config.backend() is None
    for var in ("LORA_KERNELS_TRITON_MAINLOOP", "LORA_KERNELS_TRITON_FP32_PRECISION", "LORA_KERNELS_TRITON_AUTOTUNE"):
        monkeypatch.delenv(var, raising=False)
    kn = _config.triton_knobs()
    gpu = not _config.TRITON_INTERPRET
    # the default, auto: the TMA kernel at low rank, cuBLAS otherwise (both off under the interpreter)
    assert (kn.autotune, kn.fp32_prec, kn.cublas, kn.tma, kn.tma_auto) == (True, "ieee", gpu, gpu, gpu)
    assert _config.triton_knobs() is kn  # parsed once per set of values
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "")  # empty: the default
    assert _config.triton_knobs() == kn
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("LORA_KERNELS_TRITON_FP32_PRECISION", "TF32")
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "triton")
    assert _config.triton_knobs() == (_config.TRITON_INTERPRET, False, False, "tf32", False, False)
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "cublas")
    assert _config.triton_knobs() == (_config.TRITON_INTERPRET, False, gpu, "tf32", False, False)
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "tma")  # cuBLAS stays the fallback of the TMA kernel
    assert _config.triton_knobs() == (_config.TRITON_INTERPRET, False, gpu, "tf32", True, False)
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "auto")
    assert _config.triton_knobs() == (_config.TRITON_INTERPRET, False, gpu, "tf32", gpu, gpu)
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "both")
    for _ in range(2):  # an invalid value raises on every call (nothing is kept)
        try:
            _config.triton_knobs()
        except ValueError as e:
            assert "LORA_KERNELS_TRITON_MAINLOOP" in str(e)
        else:
            raise AssertionError("no error for an invalid LORA_KERNELS_TRITON_MAINLOOP")


def test_import_time_settings():
    """TRITON_INTERPRET, LORA_KERNELS_TRITON_FAST_LAUNCH and LORA_KERNELS_CPP_AUTOGRAD are read when lora_kernels is
    imported: a process started with them set sees them, and changing them afterwards changes nothing."""
    code = ("import os, lora_kernels\nfrom lora_kernels import _config\n"
            "os.environ['LORA_KERNELS_CPP_AUTOGRAD'] = '1'\n"
            "print(_config.TRITON_INTERPRET, _config.TRITON_FAST_LAUNCH, _config.CPP_AUTOGRAD)")
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", LORA_KERNELS_TRITON_FAST_LAUNCH="0", LORA_KERNELS_CPP_AUTOGRAD="0",
               PYTHONPATH=os.pathsep.join(path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False"]
    assert lora_kernels._config is _config


@pytest.mark.parametrize("value,expected", [(None, "True"), ("1", "True"), ("0", "False")])
def test_triton_fp32_split_default_on(value, expected):
    """LORA_KERNELS_TRITON_FP32_SPLIT (read at import): the bf16x3 adapter products are on unless it is "0"."""
    code = "from lora_kernels import _config\nprint(_config.TRITON_FP32_SPLIT)"
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {k: v for k, v in os.environ.items() if k != "LORA_KERNELS_TRITON_FP32_SPLIT"}
    env["PYTHONPATH"] = os.pathsep.join(path)
    if value is not None:
        env["LORA_KERNELS_TRITON_FP32_SPLIT"] = value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [expected]
