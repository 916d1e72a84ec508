"""The Triton backend's TMA persistent output kernel (LORA_KERNELS_TRITON_MAINLOOP=tma): the forward's y and the
backward's dx (with dA and dB) against float64 under the tolerance rule of tests/conftest.py (assert_tolerance:
2x PyTorch's same-precision error plus a floor), the calls that must fall back to the default path, plan replays
(the descriptors are made from each call's tensors), and the configs.

Runs on the CPU under TRITON_INTERPRET=1 (32x32x32 tiles, 4 "SMs", so the persistent loop walks several tiles per
program) with fp16 x, fp16 or fp32 adapters, and one bf16 case (the interpreter's bf16 dots are widened to fp32:
kernels._mm); on a GPU the same cases run with the GPU configs, and test_llama_shape_bf16_gpu adds the Llama-3-8B
shape (it needs compute capability 9.0). Two checks need no GPU and no interpreter (subprocesses): every GPU config
pick compiles for sm_90 within its shared-memory estimate, and the planner's direct relaunches of the kernel (through
a stand-in driver) hand it descriptors of each call's own tensors."""
import pytest
import torch

from conftest import HAS_CUDA, TRITON_PYTHONS, assert_tolerance, check_lora_linear, formula, triton_device_or_skip

DEV = triton_device_or_skip()

from lora_kernels.backends.triton import configs as tc  # noqa: E402
from lora_kernels.backends.triton import launch as tb  # noqa: E402

# Outputs start as NaN (conftest.poisoned_outputs): an element the kernel does not write fails the finiteness check.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

HOPPER = HAS_CUDA and torch.cuda.get_device_capability() >= (9, 0)
# where the TMA kernel can run at all: the interpreter, or a GPU of compute capability 9.0 or newer
TMA_HERE = DEV == "cpu" or HOPPER


@pytest.fixture
def tma(monkeypatch):
    """Selects the TMA main loop and starts from no plans (each test plans its calls, and _GEMM_PATHS records how)."""
    monkeypatch.setenv("LORA_KERNELS_TRITON_MAINLOOP", "tma")
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(tb, "_PLANS", {})
    tb._GEMM_PATHS.clear()
    return tb._GEMM_PATHS


def _make(M, K, N, r, dtype, adapter_dtype, bias, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    x = rnd(M, K).to(dtype)
    W = (rnd(N, K) / K**0.5).to(dtype)
    b = rnd(N).to(dtype) if bias else None
    A = (rnd(r, K) / K**0.5).to(adapter_dtype)
    B = (rnd(N, r) / r**0.5).to(adapter_dtype)
    return [t if t is None else t.to(DEV) for t in (x, W, b, A, B)]


def _run_and_check(M, K, N, r, dtype, adapter_dtype, bias, p, seed=0, x_transform=None):
    """lora_linear forward and backward on the triton backend against float64 (the contract test's rule)."""
    gen = torch.Generator().manual_seed(seed)
    x, W, b, A, B = _make(M, K, N, r, dtype, adapter_dtype, bias, gen)
    if x_transform is not None:
        x = x_transform(x)
    # x as it is (its strides and address: a clone would be contiguous and aligned)
    check_lora_linear(x, W, b, A, B, 0.75, p, "triton",
                      dy_fn=lambda y: torch.randn(y.shape, generator=gen).to(y.dtype).to(DEV))


def _paths(log):
    """{pass: (mainloop, why not tma)} of the output passes planned since the fixture cleared the record."""
    return {name: (loop, why) for name, _, loop, why in log}


F16, F32 = torch.float16, torch.float32
# (M, K, N, r, adapter dtype, bias, p): M not a multiple of the tile; K and N multiples of 8, not of the tile (32 under
# the interpreter, 64 and 128/256 on a GPU); every r, both adapter dtypes, bias and dropout each both ways.
CASES = [
    (100, 72, 88, 5, F16, True, 0.0),
    (100, 72, 88, 16, F32, False, 0.0),
    (130, 40, 104, 64, F16, False, 0.1),
    (70, 104, 40, 5, F32, True, 0.1),
    (130, 40, 104, 16, F16, True, 0.1),
    (100, 88, 72, 32, F32, True, 0.0),  # fp32 adapters up to _TMA_MAX_R_PAD_F32 (64: FALLBACKS)
]


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}_K{}_N{}_r{}_{}_b{}_p{}".format(
    *c[:4], str(c[4]).split(".")[-1], *c[5:]))
def test_tma_fp16_vs_float64(tma, case):
    M, K, N, r, adt, bias, p = case
    _run_and_check(M, K, N, r, F16, adt, bias, p, seed=hash(case) % 2**31)
    assert _paths(tma) == {"y": ("tma", None), "dx": ("tma", None)}


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
def test_tma_bf16(tma):
    _run_and_check(100, 72, 88, 16, torch.bfloat16, torch.bfloat16, True, 0.1, seed=3)
    assert _paths(tma) == {"y": ("tma", None), "dx": ("tma", None)}



@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
def test_output_stored_in_halves(tma, monkeypatch):
    """C_SPLIT = 2 (configs._tma_config's pick where the whole output tile does not fit, as the 128x256 tile with
    fp32 adapters): each tile stored as two (BM, BN / 2) halves, every column where it belongs. Forced on a shape of
    its own (a new plan), against float64, forward and dx."""
    real = tb._tma_config
    monkeypatch.setattr(tb, "_tma_config", lambda *a: dict(real(*a), C_SPLIT=2))
    _run_and_check(96, 80, 96, 16, F16, F32, True, 0.0, seed=11)
    assert _paths(tma) == {"y": ("tma", None), "dx": ("tma", None)}


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
@pytest.mark.parametrize("c_split", [1, 2])
def test_forward_scaled_in_the_epilogue(tma, monkeypatch, c_split):
    """forward_scaled on the TMA kernel: y = c ⊙ (x Wᵀ + s·u Bᵀ) + b with the column scale in its epilogue (one
    launch, no pass over y), the output whole or in halves, against float64 with PEFT's rounding as the baseline."""
    real = tb._tma_config
    monkeypatch.setattr(tb, "_tma_config", lambda *a: dict(real(*a), C_SPLIT=c_split))
    gen = torch.Generator().manual_seed(21)
    x, W, b, A, B = _make(100, 72, 88, 16, F16, F32, True, gen)
    c = (torch.rand(88, generator=gen) * 3 - 1).to(DEV)
    y, u = tb.forward_scaled(x, W, b, A, B, c, 0.75, 0.0, 0, 0)
    assert _paths(tma) == {"y": ("tma", None)}
    x64, W64, A64, B64 = (t.double() for t in (x, W, A, B))
    ref = c.double() * (x64 @ W64.T + 0.75 * (x64 @ A64.T) @ B64.T) + b.double()
    base = (c * (torch.nn.functional.linear(x, W).float() + 0.75 * (x.float() @ A.T) @ B.T) + b.float()).to(F16)
    assert_tolerance(y, ref, base, "y")

def _padded(t):
    """t as a view whose rows are padded by 8 elements (row stride + 16 bytes at 16 bits: still TMA-aligned)."""
    M, K = t.shape
    big = torch.full((M, K + 8), float("nan"), dtype=t.dtype, device=t.device)
    big[:, 8:] = t
    return big[:, 8:]


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
def test_tma_strided_operands(tma):
    """x and dy with padded rows, straight into the backend (the op makes its inputs contiguous): the descriptors
    take the row strides."""
    gen = torch.Generator().manual_seed(4)
    M, K, N, r, s = 100, 72, 88, 5, 0.75
    x, W, b, A, B = _make(M, K, N, r, F16, F16, True, gen)
    dy = torch.randn(M, N, generator=gen).to(F16).to(DEV)
    xs, dys = _padded(x), _padded(dy)
    assert xs.stride() == (K + 8, 1) and dys.stride() == (N + 8, 1)
    y, u = tb.forward(xs, W, b, A, B, s, 0.0, 0, 0)
    dx, _, _ = tb.backward(dys, xs, W, A, B, u, s, 0.0, 0, 0, True, False, False)
    assert _paths(tma) == {"y": ("tma", None), "dx": ("tma", None)}
    d = [t.double() for t in (x, W, b, A, B, dy)]
    assert_tolerance(y, formula(*d[:5], s), formula(x, W, b, A, B, s), "y")
    g = (dy.float() @ B.float())
    ref_dx = d[5] @ d[1] + s * (d[5] @ d[4]) @ d[3]
    assert_tolerance(dx, ref_dx, (dy @ W + (s * g).to(F16) @ A).to(F16), "dx")


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
def test_replay_uses_the_new_tensors(tma):
    """A plan's second call (a replay, nothing planned) gets descriptors of its own tensors: its result is its own."""
    for seed in (5, 6):
        _run_and_check(100, 72, 88, 16, F16, F16, True, 0.0, seed=seed)
    assert len(tma) == 2  # one forward and one backward plan, replayed by the second call
    assert _paths(tma) == {"y": ("tma", None), "dx": ("tma", None)}


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
def test_backward_dx_from(tma):
    """DoRA's backward (dx's frozen product from another operand than dy) through the TMA kernel."""
    gen = torch.Generator().manual_seed(7)
    M, K, N, r = 100, 72, 88, 16
    x, W, _, A, B = _make(M, K, N, r, F16, F16, False, gen)
    dy = torch.randn(M, N, generator=gen).to(F16).to(DEV)
    dxf = torch.randn(M, N, generator=gen).to(F16).to(DEV)
    u = (x.float() @ A.float().T) * 0.5
    dx, _, _ = tb.backward_dx_from(dy, x, W, A, B, u, dxf, 0.5, 0.0, 0, 0, True, False, False)
    ref = dxf.double() @ W.double() + 0.5 * (dy.double() @ B.double()) @ A.double()
    base = (dxf @ W + (0.5 * (dy.float() @ B.float())).to(F16) @ A).to(F16)
    assert_tolerance(dx, ref, base, "dx")
    assert _paths(tma) == {"dx": ("tma", None)}


# (name, M, K, N, r, dtype, how the call differs, part of the reason): calls the TMA kernel cannot take, computed by
# the default path instead (the pointer-based loop under the interpreter, cuBLAS on a GPU).
FALLBACKS = [
    ("fp32", 100, 72, 88, 16, F32, None, "inputs"),
    ("small_m", 40, 72, 88, 16, F16, None, "SMALL_M"),
    ("k_not_8", 100, 36, 88, 16, F16, None, "16-byte"),
    ("n_not_8", 100, 72, 60, 16, F16, None, "16-byte"),
    ("unaligned_x", 100, 72, 88, 16, F16, "unaligned", "16-byte"),
    ("rank_100", 100, 72, 88, 100, F16, None, "rank"),
    ("fp32_adapters_rank_64", 100, 88, 72, 64, F16, "fp32 adapters", "fp32 adapters"),
]


@pytest.mark.parametrize("name,M,K,N,r,dtype,how,why", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_fallbacks(tma, name, M, K, N, r, dtype, how, why):
    x_transform = None
    if how == "unaligned":  # x one element past an aligned address
        def x_transform(x):
            flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
            out = flat[1:].view(x.shape)
            out.copy_(x)
            return out
    adapter_dtype = F32 if how == "fp32 adapters" else dtype
    _run_and_check(M, K, N, r, dtype, adapter_dtype, True, 0.1, seed=8, x_transform=x_transform)
    paths = _paths(tma)
    expected = "cublas" if HAS_CUDA else "triton"
    if M <= tb.SMALL_M:
        assert "y" not in paths  # the one-launch small-M forward
    if how == "unaligned" and TMA_HERE:  # x is the forward's operand only: dx reads dy, W and g
        assert paths.pop("dx") == ("tma", None)
    for name_, (loop, reason) in paths.items():
        assert loop == expected, (name_, loop, reason)
        assert (why if TMA_HERE else "compute capability") in reason, (name_, reason)


@pytest.mark.parametrize("r,p", [(16, 0.0), (17, 0.0), (16, 0.1)])
def test_default_mainloop_takes_tma_at_low_rank(monkeypatch, r, p):
    """The default (auto) takes the TMA kernel where the rank pads to at most 16 on a Hopper GPU, except for dx with
    dropout (the mask in the epilogue); cuBLAS above that rank, for that dx and below Hopper; under the interpreter
    the pointer kernel (as with triton). Both outputs checked against float64 either way."""
    monkeypatch.delenv("LORA_KERNELS_TRITON_MAINLOOP", raising=False)
    monkeypatch.setenv("LORA_KERNELS_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(tb, "_PLANS", {})
    tb._GEMM_PATHS.clear()
    gen = torch.Generator().manual_seed(9)
    x, W, b, A, B = _make(100, 72, 88, r, F16, F16, True, gen)
    check_lora_linear(x, W, b, A, B, 0.75, p, "triton",
                      dy_fn=lambda y: torch.randn(y.shape, generator=gen).to(y.dtype).to(DEV))
    paths = {name: (loop, why) for name, _, loop, why in tb._GEMM_PATHS}
    assert set(paths) == {"y", "dx"}, paths
    for name, (loop, why) in paths.items():
        masked = name == "dx" and p > 0
        if not HAS_CUDA:
            assert loop == "triton", (name, loop, why)
        elif HOPPER and r <= tc._TMA_AUTO_MAX_R_PAD and not masked:
            assert (loop, why) == ("tma", None), (name, why)
        else:
            assert loop == "cublas", (name, loop, why)
            expected = "compute capability" if not HOPPER else "dropout mask" if masked else "rank padded to 32"
            assert expected in why, (name, why)


def test_gpu_configs():
    """The GPU configs (pure functions, no GPU needed): the probe's tiles, and every pick within the estimate."""
    sms = 132
    wide = tc._tma_config(2048, 4096, 2, 16, 2, False, sms, False)
    assert (wide["BM"], wide["BN"], wide["BK"], wide["num_stages"], wide["num_warps"], wide["GROUP_M"]) == \
        (128, 256, 64, 3, 8, 8) and wide["C_SPLIT"] == 1
    # fp32 adapters (staged as fp32 for the split): the same tile and depth, the output stored in halves
    wide32 = tc._tma_config(2048, 4096, 2, 16, 4, False, sms, False)
    assert (wide32["BM"], wide32["BN"], wide32["num_stages"], wide32["C_SPLIT"]) == (128, 256, 3, 2)
    narrow = tc._tma_config(2048, 1024, 2, 16, 2, False, sms, False)
    assert (narrow["BM"], narrow["BN"], narrow["BK"], narrow["num_stages"], narrow["num_warps"]) == \
        (128, 128, 64, 4, 4)
    for r_pad in (16, 32, 64):
        for M, N in ((2048, 4096), (2048, 1024), (8192, 14336), (65, 8)):
            for lb_elt in (2, 4):
                for drop in (False, True):
                    if lb_elt == 4 and r_pad > tc._TMA_MAX_R_PAD_F32:
                        continue  # not taken (launch._tma_unsupported)
                    c = tc._tma_config(M, N, 2, r_pad, lb_elt, drop, sms, False)
                    assert c["FLATTEN"] and c["BN"] % 8 == 0  # the dropout mask's column groups are 8 wide
                    assert c["C_SPLIT"] in (1, 2) and c["BN"] // c["C_SPLIT"] % 8 == 0  # 16-byte TMA rows
                    assert tc._tma_smem(c["BM"], c["BN"], c["BK"], c["num_stages"], 2, r_pad, lb_elt, drop,
                                        c["C_SPLIT"]) <= tc._TMA_SMEM
    assert tc._tma_config(100, 100, 2, 16, 2, False, 4, True)["BM"] == 32  # the interpreter's small tiles


_COMPILE_SCRIPT = r"""
import itertools, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton import configs as tc, kernels

kernel = kernels._output_gemm_tma_kernel
names = kernel.arg_names
seen, rows = set(), []
for (M, N), r_pad, lb, drop in itertools.product([(8192, 4096), (2048, 1024)], [16, 32, 64], ["bf16", "fp32"],
                                                 [False, True]):
    if lb == "fp32" and r_pad > tc._TMA_MAX_R_PAD_F32:
        continue  # not taken (launch._tma_unsupported)
    b_kn = drop  # dropout only in dx (W as stored is (K, N) there); the forward has a bias
    cfg = tc._tma_config(M, N, 2, r_pad, 4 if lb == "fp32" else 2, drop, 132, False)
    key = (tuple(sorted(cfg.items())), r_pad, lb, drop)
    if key in seen:
        continue
    seen.add(key)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    # l and lb through TMA descriptors (LR_TMA, as the host launches these ranks; lb (R, N) in dx, (N, R) forward)
    const = dict(HAS_BIAS=not drop, HAS_DROPOUT=drop, R_PAD=r_pad, DOT_PREC="tf32", B_KN=b_kn, LR_TMA=True,
                 LB_RN=b_kn, BM=BM, BN=BN, BK=BK, GROUP_M=cfg["GROUP_M"], NUM_SMS=132, FLATTEN=cfg["FLATTEN"],
                 C_SPLIT=cfg["C_SPLIT"], COL_SCALE=not drop)  # the forward as DoRA's forward_scaled makes it
    types = {"a_desc": f"tensordesc<bf16[{BM}, {BK}]>",
             "b_desc": f"tensordesc<bf16[{BK}, {BN}]>" if b_kn else f"tensordesc<bf16[{BN}, {BK}]>",
             "c_desc": f"tensordesc<bf16[{BM}, {BN // cfg['C_SPLIT']}]>", "l_src": f"tensordesc<fp32[{BM}, {r_pad}]>",
             "lb_src": f"tensordesc<{lb}[{r_pad}, {BN}]>" if b_kn else f"tensordesc<{lb}[{BN}, {r_pad}]>",
             "bias_ptr": "*bf16", "cs_ptr": "*fp32", "seed_ptr": "*bf16", "lora_scale": "fp32", "seed": "i64",
             "offset": "i64"}
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    div = ["bias_ptr", "seed_ptr", "M", "N", "K", "s_lm", "s_lbr", "K8"]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    ptx = c.asm["ptx"]
    rows.append(dict(cfg=[M, N, r_pad, lb, drop, BM, BN, cfg["num_stages"], cfg["num_warps"]], shared=c.metadata.shared,
                     estimate=tc._tma_smem(BM, BN, BK, cfg["num_stages"], 2, r_pad, 4 if lb == "fp32" else 2, drop,
                                           cfg["C_SPLIT"]),
                     wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                     local=ptx.count("ld.local") + ptx.count("st.local")))
print(json.dumps(rows))
"""


def test_gpu_configs_compile_within_shared_memory():
    """Every GPU config pick (ranks 16-64, 16-bit and fp32 adapters, with and without dropout) compiles for sm_90
    within its shared-memory estimate and the 227 KB of a Hopper block, with TMA loads, wgmma and no local memory
    (spills). Compiled by the installed triton on the host (no GPU needed)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) >= 8
    for row in rows:
        assert row["shared"] <= min(row["estimate"], 227 * 1024), row
        assert row["wgmma"] and row["tma"] and row["local"] == 0, row


_SERIAL_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.backends.triton import configs as tc, kernels

try:  # the ptxas triton itself assembles sm_90 PTX with (it accepts the PTX version triton writes)
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
except Exception:
    ptxas = None
if not ptxas or not os.path.exists(ptxas):
    import shutil
    ptxas = shutil.which("ptxas")
if not ptxas:
    print(json.dumps(dict(skip="no ptxas found")))
    sys.exit(0)
kernel = kernels._output_gemm_tma_kernel
names = kernel.arg_names
rows = []
# the forward at 8192 x 4096 -> 4096, bf16, r = 16, bf16 and fp32 adapters (the split rank-r term, output in halves),
# the last with DoRA's column scale too (forward_scaled)
for has_bias, lb, col_scale in ((False, "bf16", False), (True, "bf16", False), (True, "fp32", False),
                                (True, "fp32", True)):
    r_pad = 16
    cfg = tc._tma_config(8192, 4096, 2, r_pad, 4 if lb == "fp32" else 2, False, 132, False)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    const = dict(HAS_BIAS=has_bias, HAS_DROPOUT=False, R_PAD=r_pad, DOT_PREC="tf32", B_KN=False, LR_TMA=True,
                 LB_RN=False, BM=BM, BN=BN, BK=BK, GROUP_M=cfg["GROUP_M"], NUM_SMS=132, FLATTEN=cfg["FLATTEN"],
                 C_SPLIT=cfg["C_SPLIT"], COL_SCALE=col_scale)
    types = {"a_desc": f"tensordesc<bf16[{BM}, {BK}]>", "b_desc": f"tensordesc<bf16[{BN}, {BK}]>",
             "c_desc": f"tensordesc<bf16[{BM}, {BN // cfg['C_SPLIT']}]>", "l_src": f"tensordesc<fp32[{BM}, {r_pad}]>",
             "lb_src": f"tensordesc<{lb}[{BN}, {r_pad}]>", "bias_ptr": "*bf16", "cs_ptr": "*fp32", "seed_ptr": "*bf16",
             "lora_scale": "fp32", "seed": "i64", "offset": "i64"}
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    div = ["bias_ptr", "seed_ptr", "M", "N", "K", "R", "s_lm", "s_lbn", "K8"]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "k.ptx"), "w") as f:
        f.write(c.asm["ptx"])
    p = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                       capture_output=True, text=True)
    rows.append(dict(bias=has_bias, lb=lb, rc=p.returncode, log=(p.stdout + p.stderr)[-4000:], ptxas=ptxas))
print(json.dumps(dict(rows=rows)))
"""


def test_tma_kernel_wgmma_not_serialized():
    """The forward's 8192 x 4096 -> 4096 config (bf16, r = 16; bf16 adapters with and without bias, fp32 adapters
    with bias: the split rank-r term), l and lb through TMA descriptors, compiled for sm_90a by the installed triton and
    assembled by `ptxas -v`: no warning C7515 ("wgmma.mma_async instructions are serialized ..."), which would mean
    every wgmma of the kernel waits for the previous one (triton 3.6 with the rank-r operands from pointer loads:
    kernels, above _output_gemm_tma_kernel). Skipped where no ptxas is found, or where it cannot assemble this PTX."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SERIAL_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        if row["rc"] != 0 and "version" in row["log"].lower():
            pytest.skip(f"{row['ptxas']} cannot assemble this triton's PTX: {row['log'][-300:]}")
        assert row["rc"] == 0, row
        assert "C7515" not in row["log"] and "serialized" not in row["log"], row
        assert "Used" in row["log"], row  # ptxas -v reported the kernel


def test_rank_tma_layout():
    """Which calls read l and lb through TMA descriptors (launch._rank_tma_layout): 16-byte aligned bases and row
    strides, contiguous rows; the rest keep the pointer loads."""
    f32, bf16 = torch.float32, torch.bfloat16

    def val(shape, strides, dtype, aligned=True):
        return tb._Val(0, shape, strides, dtype, "cpu", aligned)

    M, N, K = 300, 320, 256
    for r, ok in ((16, True), (64, True), (8, True), (5, False), (12, False)):
        l = val((M, r), (r, 1), f32)
        B = val((N, r), (r, 1), bf16)  # the forward: lb = B^T[r, n], strides (1, r)
        assert tb._rank_tma_layout(l, (1, r), B, r) == ((True, False) if ok else (False, False)), r
    for r, ok in ((16, True), (5, False), (12, True)):  # dx: lb = A (r, K) as stored; l = g needs r % 4 == 0
        l = val((M, r), (r, 1), f32)
        A = val((r, K), (K, 1), bf16)
        assert tb._rank_tma_layout(l, (K, 1), A, r) == ((True, True) if ok else (False, False)), r
    B32 = val((N, 4), (4, 1), f32)  # fp32 adapters: 16-byte rows from r = 4 on
    assert tb._rank_tma_layout(val((M, 4), (4, 1), f32), (1, 4), B32, 4) == (True, False)
    l = val((M, 16), (16, 1), f32)
    assert tb._rank_tma_layout(l, (1, 16), val((N, 16), (16, 1), bf16, aligned=False), 16) == (False, False)
    assert tb._rank_tma_layout(val((M, 16), (16, 1), f32, aligned=False), (1, 16), val((N, 16), (16, 1), bf16),
                               16) == (False, False)
    assert tb._rank_tma_layout(l, (2, 40), val((N, 16), (40, 2), bf16), 16) == (False, False)  # no unit stride


@pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability 9.0 or newer")
def test_llama_shape_bf16_gpu(tma):
    """Llama-3-8B's 4096 -> 4096 projection at M = 2048, bf16, through the TMA kernel (the 128x256 tile), forward and
    backward against float64."""
    _run_and_check(2048, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, False, 0.0, seed=10)
    assert _paths(tma) == {"y": ("tma", None), "dx": ("tma", None)}
    _run_and_check(2048, 4096, 4096, 16, torch.bfloat16, torch.float32, True, 0.1, seed=11)


@pytest.mark.skipif(not TMA_HERE, reason="the TMA kernel needs compute capability 9.0 (or the interpreter)")
def test_poison_exposes_an_unwritten_output(tma, monkeypatch):
    """The harness check: a TMA kernel that writes nothing leaves y NaN (so the checks above would fail)."""

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tb, "_output_gemm_tma_kernel", _NoLaunch())
    gen = torch.Generator().manual_seed(12)
    x, W, b, A, B = _make(100, 72, 88, 16, F16, F16, True, gen)
    y, _ = tb.forward(x, W, b, A, B, 1.0, 0.0, 0, 0)
    assert _paths(tma) == {"y": ("tma", None)} and torch.isnan(y).all()


# The planner's replays of a TMA launch, through triton's real JIT and the plan's direct relaunch, on a CPU-only
# machine: a stand-in driver (tests/fake_triton_driver.py) makes the kernel compile for sm_90 and "launch" into a
# launcher that records its arguments. The TMA decision is made as on an sm_90 GPU (the planner sees the CPU tensors
# as on cuda:0, compute capability 9.0).
_REPLAY_SCRIPT = r"""
import json, os
import torch
import triton

import fake_triton_driver

LAUNCHES = fake_triton_driver.install_recording()
os.environ["LORA_KERNELS_TRITON_MAINLOOP"] = "tma"
from lora_kernels.backends.triton import launch as tb  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

_real = tb._tma_unsupported


def as_on_hopper(pl, *args):
    cpu, pl.device = pl.device, torch.device("cuda", 0)
    try:
        return _real(pl, *args)
    finally:
        pl.device = cpu


tb._tma_unsupported = as_on_hopper
tb._capability = lambda index: (9, 0)
tb._smem_per_block = lambda device: 227 * 1024  # an H100's block
names = {}


def canon(a):
    if isinstance(a, torch.Tensor):
        return ["tensor", names.get(a.data_ptr(), "?"), str(a.dtype), list(a.shape)]
    if isinstance(a, TensorDescriptor):
        return ["desc", names.get(a.base.data_ptr(), "?"), [int(s) for s in a.shape], [int(s) for s in a.strides],
                list(a.block_shape)]
    if isinstance(a, fake_triton_driver.FakeTensorMap):  # triton 3.6: the descriptor as its launcher encodes it
        return ["desc", names.get(a.ptr, "?"), a.shape, a.strides, a.block]
    return a if isinstance(a, (int, float, str, bool, type(None))) else repr(a)


def run(fn):
    start = len(LAUNCHES)
    fn()
    return [(p, f, g, [canon(a) for a in fake_triton_driver.fold_tensor_maps(args)])
            for p, f, g, args in LAUNCHES[start:]
            if any(isinstance(a, (TensorDescriptor, fake_triton_driver.FakeTensorMap)) for a in args)]


g = torch.Generator().manual_seed(0)
M, K, N, r = 300, 256, 320, 16
out = []
for call in range(3):
    x = torch.randn(M, K, generator=g).half()
    W, b = torch.randn(N, K, generator=g).half(), torch.randn(N, generator=g).half()
    A, B = torch.randn(r, K, generator=g).half(), torch.randn(N, r, generator=g).half()
    dy = torch.randn(M, N, generator=g).half()
    names.clear()
    names.update({t.data_ptr(): n for n, t in dict(x=x, W=W, dy=dy).items()})

    def step():
        y, u = tb.forward(x, W, b, A, B, 0.5, 0.0, 1234, 0)
        names[y.data_ptr()] = "y"
        tb.backward(dy, x, W, A, B, u, 0.5, 0.0, 1234, 0, True, False, False)

    launches = run(step)
    out.append(launches)
# the last call twice more, on the same inputs: the TMA descriptors triton 3.6's launcher would encode again
repeats = []
inputs = dict(names)
for _ in range(2):
    names.clear()
    names.update({p: n for p, n in inputs.items() if n != "y"})  # the earlier y's address is free again
    start = len(fake_triton_driver.FILLS)
    repeats.append(dict(launches=run(step), encoded=sorted(names.get(f.ptr, "?")
                                                           for f in fake_triton_driver.FILLS[start:])))
print(json.dumps(dict(calls=out, paths=[list(p) for p in tb._GEMM_PATHS], repeats=repeats,
                      triton=triton.__version__, fills=len(fake_triton_driver.FILLS))))
"""


@pytest.mark.parametrize("triton_python", TRITON_PYTHONS)
def test_tma_plan_replays_take_new_tensors(triton_python):
    """The first call launches the TMA kernel through the JIT; the next ones relaunch it directly, with the same
    binary, grid and arguments, except that the descriptors are made from each call's own tensors (x and W in the
    forward, y's address is new each call; dy and W in dx). The output descriptor of a call describes that call's
    output, never an earlier one's."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORA_KERNELS_TRITON_AUTOTUNE"] = "0"
    env.pop("LORA_KERNELS_TRITON_FAST_LAUNCH", None)
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, env.get("PYTHONPATH", "")])
    out = subprocess.run([triton_python, "-c", _REPLAY_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [p[2] for p in report["paths"]] == ["tma", "tma"], report["paths"]
    first, *later = report["calls"]
    assert len(first) == 2 and all(p == "jit" for p, *_ in first)  # expand y, then dx
    (_, _, _, y_args), (_, _, _, dx_args) = first
    # a over (M, K) x, b over W as stored (N, K), c over y; dx: a over dy, b over W as (K, N) = (N_layer, K_layer)
    assert y_args[:3] == [["desc", "x", [300, 256], [256, 1], y_args[0][4]], ["desc", "W", [320, 256], [256, 1],
                          y_args[1][4]], ["desc", "y", [300, 320], [320, 1], y_args[2][4]]]
    assert [a[:2] for a in dx_args[:3]] == [["desc", "dy"], ["desc", "W"], ["desc", "?"]]
    assert dx_args[1][2] == [320, 256]
    for call in later:
        assert len(call) == 2 and all(p == "fast" for p, *_ in call)
        for (_, f1, g1, a1), (_, f2, g2, a2) in zip(first, call):
            assert (f2, g2, a2) == (f1, g1, a1)  # names, not addresses: the same roles, each call's own tensors
    for rep in report["repeats"]:
        assert [p for p, *_ in rep["launches"]] == ["fast", "fast"]
        assert [a for *_, a in rep["launches"]] == [a for *_, a in first]
        # a repeat encodes again only what has a new address: at most the outputs and temporaries, never an input
        assert not {"x", "W", "dy"} & set(rep["encoded"]), rep["encoded"]
    if report["triton"].startswith("3.6."):  # its launcher encodes descriptors (3.9's stand-in takes them as they are)
        assert report["fills"] > 0
