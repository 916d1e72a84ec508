"""The "lorafusion" benchmark provider (bench/suite/peer_lorafusion.py): LoRAFusion's lora_v1 imports from the git-ignored
.peers/lorafusion with its stand-ins and TMA placeholders, the provider says why it is unavailable, and (under
TRITON_INTERPRET=1 on the CPU, or on a GPU) LoRAFusion's forward and gradients match the float64 formula, including
the p == 0 backward that needs the dummy mask. Skipped where .peers/lorafusion is absent (CI: bench/tools/get_lorafusion.sh
fills it). Checks that import LoRAFusion run in a subprocess: it registers modules, and Triton's interpreter mode is
chosen when its kernels are defined."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "suite")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BENCH, "peer_lorafusion.py")),
                                reason="no bench/suite/peer_lorafusion.py")
sys.path.insert(0, BENCH)


def _source_dir():
    import peer_lorafusion

    return peer_lorafusion.default_dir()


def _need_source():
    src = _source_dir()
    if not (src / "lorafusion" / "ops" / "lora_v1.py").is_file():
        pytest.skip(f"no LoRAFusion copy at {src} (bench/tools/get_lorafusion.sh fills it)")


def _run(code: str, interpret: bool = True) -> dict:
    """Run ``code`` in a fresh interpreter (bench/ and tests/ on sys.path); it prints one JSON line last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    prog = f"import sys; sys.path[:0] = [{BENCH!r}, {os.path.dirname(__file__)!r}]\n" + code
    run = subprocess.run([sys.executable, "-c", prog], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ reference check
def check_against_float64(lf, device, dtype, M, K, N, r, p, s=2.0, seed=1234, prepared=None) -> dict:
    """LoRAFusion's fwd / fwd_bwd (through the provider's callables) against the float64 formula; the dropout mask
    is LoRAFusion's own (seeded_dropout with the same seed). Returns the max errors relative to max |ref|."""
    import peer_lorafusion as P
    from lorafusion.ops.triton_ops.dropout import seeded_dropout

    g = torch.Generator(device=device).manual_seed(0)

    def rn(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype).requires_grad_(grad)

    x, W = rn(M, K, grad=True), rn(N, K, std=K ** -0.5)
    A, B = rn(r, K, std=K ** -0.5, grad=True), rn(N, r, std=r ** -0.5, grad=True)
    dy = rn(M, N)
    prep = prepared(W, A, B) if prepared else P.Prepared(lf, None, {}, s, p, seed, "")
    fwd, fwd_bwd, x3 = prep.callables(x, W, A, B, dy)
    y = fwd()
    dx, dA, dB = fwd_bwd()
    assert y.shape == (1, M, N) and dx.shape == (1, M, K) and dA.shape == A.shape and dB.shape == B.shape
    d = lambda t: t.detach().double().cpu()  # noqa: E731
    if p > 0:
        keep = seeded_dropout(x.detach(), p, seed, store_mask=True)[1].double().cpu() / (1 - p)
    else:
        keep = torch.ones(M, K, dtype=torch.float64)
    h = d(x) * keep
    u = h @ d(A).T
    gr = s * d(dy) @ d(B)
    refs = {"y": d(x) @ d(W).T + s * u @ d(B).T, "dx": d(dy) @ d(W) + (gr @ d(A)) * keep,
            "dA": gr.T @ h, "dB": s * d(dy).T @ u}
    outs = {"y": y, "dx": dx, "dA": dA, "dB": dB}
    errs = {k: ((d(outs[k]).reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item() for k, ref in refs.items()}
    errs["kept"] = float((keep != 0).double().mean())
    return errs


# ------------------------------------------------------------------------------------------------------- the tests
def test_missing_source_is_unavailable(tmp_path, monkeypatch):
    import peer_lorafusion
    import providers

    monkeypatch.setenv(peer_lorafusion.ENV_DIR, str(tmp_path / "nowhere"))
    assert peer_lorafusion.default_dir() == (tmp_path / "nowhere").resolve()
    with pytest.raises(providers.Unavailable, match="LoRAFusion source not found"):
        providers.make_case("lorafusion", 16, 32, 32, 16, 0.0, dtype=torch.float32, device="cpu")
    assert "lorafusion" in providers.PROVIDERS


def test_loader_imports_lora_v1():
    _need_source()
    out = _run("""
import json, sys, warnings
import peer_lorafusion as P
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lf = P.load()
v1 = lf.lora_v1
tp = "lorafusion.ops.triton_ops."
print(json.dumps({
    "file": v1.__file__, "root": str(P.default_dir()), "standins": lf.standins,
    "tma": [v1.HAS_TMA_DESC, v1.FORWARD_USE_TMA, v1.BACKWARD_USE_TMA],
    "fwd_kernel": v1.fused_lora_xw_sb_func is lf.kernels["fused_lora_xw_sb"].fused_lora_xw_sb,
    "dx_wrapped": v1.fused_lora_dyw_dsa_func.__name__,
    "placeholders": [sys.modules[tp + m].__doc__.startswith("Inert placeholder") for m in P._TMA_MODULES],
    "loguru_in_modules": "loguru" in sys.modules,
    "tma_warnings": [str(w.message) for w in caught if "LORAFUSION_" in str(w.message)],
    "again": P.load() is lf,
    "dummy_stride": list(lf.dummy_mask(5, 7, "cpu").stride()),
}))
""", interpret=False)
    assert out["file"].startswith(out["root"]), out
    assert out["tma"] == [False, False, False]
    assert out["fwd_kernel"] and out["dx_wrapped"] == "fused_lora_dyw_dsa_with_mask"
    assert out["placeholders"] == [True, True, True]
    assert out["again"] and not out["tma_warnings"]
    if "loguru" in out["standins"]:  # the stand-in is only in sys.modules while LoRAFusion is imported
        assert not out["loguru_in_modules"]
    assert out["dummy_stride"] == [0, 0]


def test_provider_unavailable_without_gpu():
    _need_source()
    out = _run("""
import json, torch, providers
try:
    providers.make_case("lorafusion", 16, 32, 32, 16, 0.0, dtype=torch.float32, device="cpu")
    print(json.dumps({"raised": None}))
except providers.Unavailable as e:
    print(json.dumps({"raised": str(e)}))
""", interpret=False)
    assert out["raised"] and "need a CUDA GPU" in out["raised"], out


def test_config_mapping_and_shared_memory_fit():
    """An H200 gets a copy of the H100 entry; a config that Triton refuses for shared memory gets num_stages - 1
    (simulated OutOfResources, the kernels themselves run in the interpreter)."""
    _need_source()
    out = _run("""
import dataclasses, json, torch
import peer_lorafusion as P
lf = P.load()
C = lf.config
torch.cuda.get_device_capability = lambda *a: (9, 0)
C.get_device_short_name = lambda: "h200"
hw, tuned, note = P.hardware_config(lf)
h100 = C.HARDWARE_CONFIGS[P.HOPPER_KEY]
mapped = dict(note=note, same_values=hw == h100, copy=hw is not h100, looked_up=C.get_lora_kernel_config(
    "fused_lora_xw_sb") == h100.fused_lora_xw_sb)
C.get_device_short_name = lambda: "geforce-gtx-1080"
torch.cuda.get_device_capability = lambda *a: (6, 1)
try:
    P.hardware_config(lf)
    mapped["unknown"] = None
except P.LoRAFusionUnavailable as e:
    mapped["unknown"] = str(e)

class OutOfResources(Exception):
    pass

xw = lf.kernels["fused_lora_xw_sb"]
real = xw.fused_lora_xw_sb
def limited(*a, config=None, **k):  # pretend that more than 2 stages do not fit at this rank
    if config.num_stages > 2:
        raise OutOfResources("out of resource: shared memory, Required: 245760, Hardware limit: 232448")
    return real(*a, config=config, **k)
xw.fused_lora_xw_sb = limited
small = C.LoRATritonConfig(16, 32, 16, 2, 4, 4)
tuned = {"fused_lora_xw_sb": small, "fused_lora_dyw_dsa": dataclasses.replace(small, num_stages=1),
         "fused_lora_dys_dyb": C.LoRATritonConfig(16, None, 32, 2, 1, 4)}
W, A, B = torch.randn(96, 64), torch.randn(16, 64), torch.randn(96, 16)
fitted, changes = P.fit_configs(lf, tuned, W, A, B, 2.0, 0.1)
print(json.dumps(dict(mapped=mapped, stages={k: v.num_stages for k, v in fitted.items()}, changes=changes)))
""")
    m = out["mapped"]
    assert m["note"] == "config h100-80gb-hbm3 for h200" and m["same_values"] and m["copy"] and m["looked_up"], m
    assert m["unknown"] and "no tuned config" in m["unknown"]
    assert out["stages"] == {"fused_lora_xw_sb": 2, "fused_lora_dyw_dsa": 1, "fused_lora_dys_dyb": 1}
    assert out["changes"] == ["fused_lora_xw_sb num_stages 4->2 (shared memory)"]


def test_interpreter_matches_float64():
    """LoRAFusion's Triton kernels under TRITON_INTERPRET=1 (fp32, fp16; p = 0 and 0.1; M not a multiple of the
    block) against the float64 formula, through the provider's callables."""
    _need_source()
    pytest.importorskip("triton")
    out = _run("""
import json, torch
import peer_lorafusion as P
from test_peer_lorafusion import check_against_float64
lf = P.load()
C = lf.config
small = C.LoRATritonConfig(16, 32, 16, 2, 1, 4)
C.HARDWARE_CONFIGS["cpu-interpreter"] = C.HardwareConfig(
    fused_lora_xw_sb=small, fused_lora_xw_sb_tma=None, fused_lora_dyw_dsa=small, fused_lora_dyw_dsa_tma=None,
    fused_lora_dys_dyb=C.LoRATritonConfig(16, None, 32, 2, 1, 4), fused_multi_lora_block_size_m=16,
    fused_multi_lora_xw_sb=small, fused_multi_lora_dyw_dsa=small, fused_multi_lora_dys_dyb=small)
C.get_device_short_name = lambda: "cpu-interpreter"
res = {}
for dt in (torch.float32, torch.float16):
    for p in (0.0, 0.1):
        try:
            res[f"{dt}-{p}"] = check_against_float64(lf, "cpu", dt, 40, 64, 96, 16, p)
        except AssertionError:
            raise
        except Exception as e:  # the interpreter cannot run them (a Triton version LoRAFusion does not support)
            print(json.dumps({"interpreter_failed": f"{type(e).__name__}: {e}"[:500]}))
            raise SystemExit(0)
print(json.dumps(res))
""")
    if "interpreter_failed" in out:
        pytest.skip("Triton's interpreter cannot run LoRAFusion's kernels here: " + out["interpreter_failed"])
    for key, errs in out.items():
        tol = 1e-5 if "float32" in key else 3e-3
        assert all(errs[k] <= tol for k in ("y", "dx", "dA", "dB")), (key, errs)
        assert (errs["kept"] == 1.0) if key.endswith("-0.0") else (0.8 < errs["kept"] < 0.97), (key, errs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_provider_matches_float64(r, p):
    """On a GPU: the provider as the benchmark builds it (bf16, the device's config, the shared-memory fit at this
    rank) against the float64 formula."""
    _need_source()
    import peer_lorafusion as P

    lf = P.load()
    notes = []

    def prepared(W, A, B):
        prep = P.prepare("cuda", W, A, B, 2.0, p)
        notes.append(prep.note)
        return prep

    errs = check_against_float64(lf, "cuda", torch.bfloat16, 1000, 4096, 4096, r, p, prepared=prepared)
    assert all(errs[k] <= 3e-2 for k in ("y", "dx", "dA", "dB")), (errs, notes)
