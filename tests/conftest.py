"""Shared test helpers: which (backend, device) pairs run here, the reference formula, the tolerance rule."""
import ast
import importlib
import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import lora_kernels

HAS_CUDA = torch.cuda.is_available()
# forward_path's suffix where the fused forward's lead tiles take the wide variant (128 x 256 cooperative tiles)
WIDE_TILE = " 128x256 cooperative"
# LORA_KERNELS_SM90_GEMM_CONFIG forces the sm_90 GEMM's tile, and with it the fused forward's (A/B timing, tests)
SM90_TILE_FORCED = os.environ.get("LORA_KERNELS_SM90_GEMM_CONFIG") in ("1", "4")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_rounds_to_bf16():
    """Makes triton's interpreter round float32 to bfloat16 to nearest even, as the GPU's conversion and torch's .to()
    do; the interpreter truncates (its cast passes no rounding mode), which on the CPU doubled the rounding error of
    every bf16 output and operand of the Triton kernels against their GPU runs. Tests only; the kernels are
    unchanged."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return
    cast = InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return TensorHandle(t.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    InterpreterBuilder.cast_impl = cast_impl


if INTERPRET:
    _interpreter_rounds_to_bf16()


def backend_cases():
    """(backend, device) pairs that can run on this machine."""
    avail = lora_kernels.available_backends()
    cases = [("torch", "cpu")]
    if INTERPRET and "triton" in avail:
        cases.append(("triton", "cpu"))
    if HAS_CUDA:
        cases += [(b, "cuda") for b in ("torch", "triton", "cuda") if b in avail]
    return cases


def nvcc_or_skip() -> str:
    """Path of nvcc (PATH, then $CUDA_HOME/bin), or skip the calling test when there is none."""
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc or not os.path.exists(nvcc):
        pytest.skip("nvcc not found")
    return nvcc


def build_host_driver(tmp_path_factory, name, driver, sources, flags=("--expt-relaxed-constexpr",)):
    """A host-side test program: `driver` (CUDA C++ source text with a main) built with nvcc against csrc/ and
    linked with `sources` (paths of csrc/ files), as PTX only (no SASS, no GPU needed); skips the calling test when
    there is no nvcc. Returns the executable's path."""
    nvcc = nvcc_or_skip()
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    d = tmp_path_factory.mktemp(name)
    (d / "driver.cu").write_text(driver)
    ptx_only = ["-std=c++17", "-arch=compute_90", "-code=compute_90", f"-I{csrc}", *flags]
    objs = []
    for src in [*sources, d / "driver.cu"]:
        obj = d / (os.path.basename(str(src)).rsplit(".", 1)[0] + ".o")
        res = subprocess.run([nvcc, *ptx_only, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        objs.append(str(obj))
    exe = d / name
    res = subprocess.run([nvcc, *ptx_only, *objs, "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return exe


def triton_device_or_skip() -> str:
    """The device the Triton backend's tests run on ("cuda", or "cpu" under TRITON_INTERPRET=1); skips the calling
    test module when there is neither, or no triton. Call it at module level, before importing the backend."""
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("triton backend tests need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
    pytest.importorskip("triton")
    return "cuda" if HAS_CUDA else "cpu"


def setup_py_function(name):
    """A function of setup.py, without running setup.py (which would build)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns[name]


def torch_cxx_std(torch_include=None) -> str:
    """The C++ standard setup.py builds with for these torch headers (default: the installed torch's)."""
    if torch_include is None:
        from torch.utils.cpp_extension import include_paths

        torch_include = include_paths()[0]
    return setup_py_function("_cxx_std")(torch_include)


# ------------------------------------------------------------------ helpers shared by several test files
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# the interpreters the Triton-compile subprocess tests run under: this one, and LORA_KERNELS_TRITON_ALT_PYTHON (a
# second interpreter with another triton version) when set
TRITON_PYTHONS = [sys.executable] + ([os.environ["LORA_KERNELS_TRITON_ALT_PYTHON"]]
                                     if os.environ.get("LORA_KERNELS_TRITON_ALT_PYTHON") else [])


def tiny_llama(dtype=torch.float32, seed=0):
    """A tiny random-init Llama (2 layers, hidden 64) in eval mode; needs transformers."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def randomize_adapters(model, seed=1, magnitudes=False):
    """lora_B random (PEFT inits it to zero) and, with ``magnitudes``, the DoRA magnitudes scaled by random factors
    (so g != 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
            elif magnitudes and "lora_magnitude_vector" in name:
                p.mul_((0.5 + torch.rand(p.shape, generator=g)).to(p.dtype))


def import_from(folder, module):
    """Imports ``module`` from ``folder`` (a bench script directory, not a package) without leaving it on sys.path."""
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(folder)


def forbid_host_reads(m):
    """With monkeypatch context ``m``: any read of a tensor's value on the host (int(), index, .item()) raises."""
    def no_host_read(*_a, **_k):
        raise AssertionError("the seed was read on the host")
    m.setattr(torch.Tensor, "__int__", no_host_read)
    m.setattr(torch.Tensor, "__index__", no_host_read)
    m.setattr(torch.Tensor, "item", no_host_read)


def dtypes_for(backend, device):
    # every backend, the interpreted Triton one included (its bf16 dots are widened to fp32: _mm in
    # lora_kernels/backends/triton/kernels/common.py)
    return [torch.float32, torch.float16, torch.bfloat16]


def formula(x, W, b, A, B, s, keep=None, p=0.0):
    """The unfused PEFT computation in the inputs' own precision (the tolerance rule's baseline), or in
    float64 when given float64 tensors (the reference)."""
    xd = x if keep is None else x * keep / (1.0 - p)
    base = F.linear(x, W, b)
    lora = F.linear(F.linear(xd.to(A.dtype), A), B.to(A.dtype)) * s
    return (base + lora).to(x.dtype)


def err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def abs_reference(fn, inputs, dy):
    """The condition scale of a multilinear formula: ``fn`` evaluated in float64 on the absolute values of
    ``inputs``, and its grads w.r.t. them for the cotangent ``|dy|``. ``fn`` is the float64 reference formula as a
    function of the differentiated inputs, with every other operand already replaced by its absolute value (and
    every scalar factor, such as s and a dropout keep/(1-p) mask, nonnegative). For a formula that is a sum of
    products of its operands, each element of the result, and of each grad, is then exactly the sum of the absolute
    values of the terms that the real computation adds up: the quantity an accumulated rounding error scales with.
    Returns (out_abs, [grad_abs for each input])."""
    ts = [t.detach().double().abs().requires_grad_() for t in inputs]
    out = fn(*ts)
    out.backward(dy.detach().double().abs())
    return out.detach(), [t.grad for t in ts]


def rounding_floor(eps_dtype, ref_max: float) -> float:
    """The tolerance rule's floor from the result's own rounding: two roundings of max|ref64| (at least 1e-3)."""
    return 2 * torch.finfo(eps_dtype).eps * max(ref_max, 1e-3)


def assert_errors_within(name, e, e0, floor):
    """The tolerance rule on measured errors: error e <= 2x the baseline's error e0 + floor."""
    assert e <= 2 * e0 + floor, f"{name}: error {e:.3e} > 2 x baseline {e0:.3e} + floor {floor:.1e}"


def assert_tolerance(out, ref64, baseline, name="output", floor=None, abs_ref=None, eps_dtype=None):
    """FlashAttention's rule: error vs float64 <= 2x the same-precision PyTorch error + a small floor.

    The floor (unless given) is the larger of
      * two roundings of the result: 2·eps·max|ref64| (eps of ``eps_dtype``, default the output's dtype), and
      * with ``abs_ref`` (abs_reference: per element, the sum of the absolute values of the terms that were added
        up), one rounding of that sum in the accumulation precision (float32 for 16-bit dtypes, which every
        backend and PyTorch accumulate in float32): eps_acc·max|abs_ref|. A result that is small by cancellation
        (one K-term dot product with M = 1, r = 1) has an error set by its terms, not by itself: with the first
        term alone the rule would judge PyTorch's own summation-order luck. For 16-bit outputs the first term
        dominates (the outputs' own rounding), so the rule is unchanged there; for float32 it is one ulp of the
        absolute sum, below the accumulated error of any long sum."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if floor is None:
        eps_dtype = eps_dtype or out.dtype
        floor = rounding_floor(eps_dtype, ref64.abs().max().item() if ref64.numel() else 0.0)
        if abs_ref is not None:
            assert abs_ref.shape == ref64.shape, f"{name}: abs_ref shape {tuple(abs_ref.shape)}"
            assert (abs_ref >= ref64.abs() * (1 - 1e-12)).all(), f"{name}: abs_ref is not a bound of |ref64|"
            eps_acc = torch.finfo(torch.promote_types(eps_dtype, torch.float32)).eps
            floor = max(floor, eps_acc * (abs_ref.max().item() if abs_ref.numel() else 0.0))
    assert_errors_within(name, err(out, ref64), err(baseline, ref64), floor)


def check_lora_linear(x, W, b, A, B, s, p, backend, dy_fn=torch.randn_like):
    """lora_linear's y and its grads for (x, A, B) on `backend` against float64 math (the tolerance rule,
    assert_tolerance, with the sums of |terms| as the floor's scale). x is passed as it is (its strides and address);
    dy = dy_fn(y). The dropout mask the call used is read back (record_dropout) and applied to the reference."""
    from lora_kernels.ops import record_dropout
    xg = x.detach().requires_grad_()
    Ag, Bg = (t.detach().clone().requires_grad_() for t in (A, B))
    with record_dropout() as calls:
        y = lora_kernels.lora_linear(xg, W, b, Ag, Bg, s, dropout_p=p, backend=backend)
    keep = None
    if p > 0 and x.numel():
        assert len(calls) == 1
        keep = lora_kernels.dropout_mask(*calls[0], x.shape, p, device=x.device)
    dy = dy_fn(y)
    y.backward(dy)

    def grads(*ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out = formula(ts[0], W.to(ts[0].dtype), None if b is None else b.to(ts[0].dtype), ts[1], ts[2], s, keep, p)
        out.backward(dy.to(out.dtype))
        return out, [t.grad for t in ts]

    ref, ref_g = grads(x.double(), A.double(), B.double())
    base, base_g = grads(x, A, B)
    # the floor's scale: the sums of |terms| (s > 0, keep/(1-p) >= 0: the formula is multilinear in the rest)
    Wa, ba = W.double().abs(), None if b is None else b.double().abs()
    ref_abs, abs_g = abs_reference(lambda x, A, B: formula(x, Wa, ba, A, B, s, keep, p), (x, A, B), dy)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W.shape[0])
    assert_tolerance(y, ref, base, "y", abs_ref=ref_abs)
    for name, got, r64, b0, a64 in zip(("dx", "dA", "dB"), (xg.grad, Ag.grad, Bg.grad), ref_g, base_g, abs_g):
        assert got.dtype == {"dx": x, "dA": A, "dB": B}[name].dtype, name
        assert_tolerance(got, r64, b0, name, abs_ref=a64)


def live_at_peak(fn, ours=("lora_kernels",)):
    """GPU memory that ``fn`` itself allocates, at its peak: (peak bytes, [(bytes, where)] of the blocks live then,
    largest first), from the CUDA caching allocator's history replayed event by event. Blocks that existed before
    fn (and their frees during it) do not count, unlike max_memory_allocated() minus a start value, which a free of
    an older block (a collected cycle of an earlier test) lowers. ``where`` is the innermost frames whose file path
    contains one of ``ours``."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)

    def where(frames):
        mine = [f for f in frames if any(k in f.get("filename", "") for k in ours)]
        return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in mine[:4]) or "?"

    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    return peak, sorted(((size, where(frames)) for size, frames in at_peak.values()), reverse=True)


def assert_cuda_forward(cb, x, W, b, A, B, s, p=0.0, seed=0, offset=0):
    """The cuda backend's forward (cuda_backend `cb`, 2-D inputs): y and the saved u against the float64 formula with
    the same dropout mask (the contract's, lora_kernels.dropout_mask of seed and offset), the same-precision formula
    as the baseline; a second call gives the same bits (fixed reduction orders, one owner per element)."""
    M, N, r = x.shape[0], W.shape[0], A.shape[0]
    y, u = cb.forward(x, W, b, A, B, s, p, seed, offset)
    keep = lora_kernels.dropout_mask(seed, offset, tuple(x.shape), p, device=x.device) if p > 0 else None

    def formula(xx, WW, bb, AA, BB):
        xd = xx if keep is None else xx * keep / (1.0 - p)
        uu = s * (xd.to(AA.dtype) @ AA.t())
        base = F.linear(xx, WW, bb)
        return (base + (uu @ BB.to(AA.dtype).t()).to(base.dtype)).to(xx.dtype), uu

    ref_y, ref_u = formula(x.double(), W.double(), None if b is None else b.double(), A.double(), B.double())
    base_y, base_u = formula(x, W, b, A, B)
    assert y.dtype == x.dtype and y.shape == (M, N) and u.dtype == torch.float32 and u.shape == (M, r)
    assert_tolerance(y, ref_y, base_y, "y")
    assert_tolerance(u, ref_u, base_u.float(), "u")
    y2, u2 = cb.forward(x, W, b, A, B, s, p, seed, offset)
    assert torch.equal(y, y2) and torch.equal(u, u2)


def assert_cuda_backend_deterministic(M, K, N, r, scaling=2.0, adapter_dtype=torch.float32):
    """Two identical fwd+bwd calls of the cuda backend (bf16 x, adapters in adapter_dtype) give bit-identical y and
    grads."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    A = (torch.randn(r, K, device="cuda", dtype=adapter_dtype) / K ** 0.5).requires_grad_()
    B = torch.randn(N, r, device="cuda", dtype=adapter_dtype).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        y = lora_kernels.lora_linear(x, W, None, A, B, scaling, backend="cuda")
        outs.append((y, *torch.autograd.grad(y, (x, A, B), dy)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs for every test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Makes every output a backend allocates start as NaN, so an element a kernel fails to write shows up as a
    non-finite value (the tolerance checks reject those). Python backends allocate with ``torch.empty``: it is
    wrapped to fill floating tensors with NaN. The C++ backend allocates with ``at::empty`` from the CUDA caching
    allocator: its free blocks, small and large pools alike, are filled with NaN before the test."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            with torch.no_grad():  # also a leaf made with requires_grad=True (torch's checkpoint makes one)
                t.fill_(float("nan"))
        return t

    if HAS_CUDA:
        blocks = [real_empty(256 * 1024, device="cuda") for _ in range(64)]  # 1 MiB each: the small pool
        blocks.append(real_empty(64 * 1024 * 1024, device="cuda"))  # 256 MiB: the large pool
        for b in blocks:
            b.fill_(float("nan"))
        torch.cuda.synchronize()
        del blocks
    monkeypatch.setattr(torch, "empty", empty)
    yield
