"""What a new user sees: the build record and the cuda backend's reason, the warning for a stale extension, the
in-tree build backend finding the installed torch, and the output and exit status of `python -m lora_kernels`."""
import importlib
import importlib.util
import os
import types
import warnings

import pytest
import torch

import lora_kernels
from lora_kernels import _dispatch, _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _info(built, torch_version=None, cuda=None, reason=None):
    return types.SimpleNamespace(CUDA_EXTENSION_BUILT=built, NOT_BUILT_REASON=reason,
                                 TORCH_VERSION=torch_version or torch.__version__,
                                 TORCH_CUDA_VERSION=cuda if torch_version else torch.version.cuda)


# ------------------------------------------------------------------------------------------- build record
def test_not_built_reason_is_plain(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: _info(False, reason="torch 2.13.0+cpu is built without CUDA"))
    assert _extension.problem() == "not built (torch 2.13.0+cpu is built without CUDA)"
    assert not _extension.stale()


def test_no_build_record_and_no_extension(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: None)
    monkeypatch.setattr(_extension, "_so_present", lambda: False)
    assert _extension.problem().startswith("not built (this lora_kernels was not installed by pip")


def test_extension_for_another_torch_is_detected(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: _info(True, "2.0.0+cu118", "11.8"))
    p = _extension.problem()
    assert p.startswith("built for torch 2.0.0+cu118 (CUDA 11.8), but this is torch " + torch.__version__)
    assert "pip install ." in p and _extension.stale()
    monkeypatch.setattr(_extension, "build_info", lambda: _info(True))
    assert _extension.problem() is None and not _extension.stale()


def test_stale_extension_is_not_imported_and_warns(monkeypatch):
    """The cuda backend reports the mismatch (it never imports the extension), and importing the package warns."""
    from lora_kernels.backends import cuda_backend

    monkeypatch.setattr(_extension, "build_info", lambda: _info(True, "2.0.0+cu118", "11.8"))
    try:
        mod = importlib.reload(cuda_backend)
        ok, reason = mod.is_available()
        assert not ok and reason.startswith("built for torch 2.0.0+cu118") and mod._C is None
        with pytest.warns(RuntimeWarning, match="cuda backend is unavailable: its extension was built for torch 2.0"):
            importlib.reload(lora_kernels)
    finally:
        monkeypatch.undo()
        importlib.reload(cuda_backend)
        importlib.reload(lora_kernels)


def test_cuda_reason_is_not_a_raw_import_error():
    reason = lora_kernels.backend_status()["cuda"]
    assert "cannot import name" not in reason
    if "cuda" not in lora_kernels.available_backends():
        assert reason.startswith("unavailable: ") and ("not built (" in reason or "built for torch" in reason
                                                       or "no CUDA device" in reason), reason


@pytest.mark.parametrize("reason,warns", [("not built (torch was not installed when lora_kernels was built)", True),
                                          ("not built (LORA_KERNELS_SKIP_CUDA_BUILD=1)", False)])
def test_auto_warns_when_cuda_tensors_fall_back(monkeypatch, reason, warns):
    """No silent fallback: auto on CUDA tensors says once why the cuda backend does not run (unless the build
    skipped it on request)."""
    loaded = {"cuda": (None, reason), "triton": (object(), "ok"), "torch": (object(), "ok")}
    monkeypatch.setattr(_dispatch, "_load", lambda name: loaded[name])
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    _dispatch._resolve_name.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _dispatch.resolve(None, "cuda") == "triton"
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert bool(msgs) == warns, msgs
        if warns:
            assert reason in msgs[0] and "triton" in msgs[0]
    finally:
        _dispatch._resolve_name.cache_clear()


# ------------------------------------------------------------------------------------------ build backend
def test_build_backend_finds_the_installed_torch(monkeypatch):
    """Under pip's isolation (PYTHONPATH pointing at the build environment) the probe still finds this torch."""
    spec = importlib.util.spec_from_file_location(
        "lora_kernels_build", os.path.join(ROOT, "build_backend", "lora_kernels_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for hook in ("build_wheel", "build_editable", "prepare_metadata_for_build_wheel", "get_requires_for_build_wheel"):
        assert callable(getattr(mod, hook))
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-build-env")
    assert mod._installed_torch_dir() == os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))


# ----------------------------------------------------------------------------------- python -m lora_kernels
def _main(capsys, *args):
    from lora_kernels.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--M", "16", "--K", "64", "--N", "32", *args])
    return e.value.code, capsys.readouterr().out


def test_main_output_is_labelled(capsys):
    code, out = _main(capsys)
    assert code == 0, out
    for text in ("Backends:", "relative errors ||got - ref|| / ||ref|| against the same computation in float64",
                 "Pass: every error below 0.001 (float32)", "Self-check passed", "Forward timing on CPU", "x floor",
                 "base linear (the floor)", "lora_kernels, torch"):
        assert text in out, text
    rows = [line for line in out.splitlines() if line.startswith("  torch    float32")]
    assert len(rows) == 2 and all(line.endswith("pass") for line in rows), rows


def test_main_exits_1_when_a_check_fails(capsys, monkeypatch):
    import lora_kernels.__main__ as main_mod

    real = main_mod.lora_linear
    monkeypatch.setattr(main_mod, "lora_linear", lambda *a, **k: real(*a, **k) * 1.01)  # 1% off
    code, out = _main(capsys)
    assert code == 1 and "FAIL" in out and "Self-check FAILED" in out


def test_main_reports_a_crashing_backend(capsys, monkeypatch):
    import lora_kernels.__main__ as main_mod

    def boom(*a, **k):
        if k.get("backend") == "torch" and torch.is_grad_enabled():
            raise RuntimeError("kernel exploded")
        return lora_kernels.lora_linear(*a, **k)

    monkeypatch.setattr(main_mod, "lora_linear", boom)
    code, out = _main(capsys)
    assert code == 1 and "FAIL: RuntimeError: kernel exploded" in out


def test_peft_row_computes_the_same_layer():
    """The PEFT comparison of the timing table (run on GPUs) times a lora.Linear equal to our op."""
    pytest.importorskip("peft")
    from lora_kernels.__main__ import _peft_layer

    W, A, B, x = torch.randn(48, 64) / 8, torch.randn(8, 64) / 8, torch.randn(48, 8), torch.randn(5, 64)
    layer = _peft_layer(W, A, B, 8, 0.0)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lora_kernels.lora_linear(x, W, None, A, B, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_main_on_gpu(capsys):
    """GPU: every available backend passes the self-check in fp32, bf16 and fp16, and the table has the PEFT row."""
    from lora_kernels.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--M", "512", "--K", "1024", "--N", "1024"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    for name in lora_kernels.available_backends():
        rows = [line for line in out.splitlines() if line.startswith(f"  {name:8s} ")]
        assert len(rows) == 6 and all(line.endswith("pass") for line in rows), rows
    if importlib.util.find_spec("peft") is not None:
        assert "PEFT lora.Linear" in out
