"""The host side of the Triton backend: ``forward`` and ``backward`` (the backend contract), the launch of each pass
with its arguments, and ``_launch``, which relaunches compiled kernels without triton's per-launch JIT work."""
from __future__ import annotations

import operator

import torch
import triton

from ... import _config
from ..._config import TritonKnobs
from ...philox import calls_per_row, keep_threshold
from .configs import (_cdiv, _dot_precision, _gemm_configs, _helper_tiles, _next_pow2, _num_sms, _rank_term_config,
                      _r_pad, _rank_f32, _small_m_heuristic, _splits, _stages, _tuned_gemm, _tuned_small_m)
from .kernels import _PER_CALL_SCALARS, _dy_pass_kernel, _output_gemm_kernel, _shrink_kernel, _small_m_kernel

SMALL_M = 64  # forward calls with M <= SMALL_M take the one-launch path (_small_m_kernel)
# dB is fused into the g pass (per-M-block fp32 partials, written then read back by the sum) when the partial
# buffer is at most this fraction of dy's bytes, i.e. when it costs no more than the second read of dy that
# the separate dB pass (_launch_shrink_t) would. Tests set it to 0 / inf to exercise both paths.
_FUSE_DB_PARTIAL_RATIO = 0.5


def is_available() -> tuple[bool, str]:
    """(True, description) when there is a CUDA device or TRITON_INTERPRET=1, else (False, reason)."""
    if _config.TRITON_INTERPRET:
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device and TRITON_INTERPRET != 1"


# ----------------------------------------------------------------------------------------------------------
# Launching. Triton's JITFunction.run costs tens of microseconds of host time per launch with the ~30 arguments of
# these kernels: it reads its knobs, binds and specializes every argument, and builds a cache key string, before the
# driver launch itself (under 1 us of Python). A LoRA forward+backward makes five or six launches, so that would be
# most of the backend's host time.
#
# _launch keeps the CompiledKernel the JIT chose on the first launch of each key, and relaunches it directly
# through its launcher, with the arguments in the order the JIT passes them. The key holds everything the JIT
# specializes on: the kernel, the device, the keyword arguments (constexprs and launch options), and every argument
# except the per-call scalars (_PER_CALL_SCALARS: do_not_specialize with fixed types), with integers by value and
# tensors by dtype and 16-byte alignment; so a key always maps to the binary the JIT would pick. While a launch hook
# is installed (profilers do that) every launch takes the JIT's path. LORA_KERNELS_TRITON_FAST_LAUNCH=0 turns this
# off; it is on only for the triton versions whose launcher convention was checked (3.6 to 3.9).
# tests/test_triton_fast_launch.py checks that both paths launch the same binary with the same arguments.
# ----------------------------------------------------------------------------------------------------------
def _fast_launch_enabled() -> bool:
    if not _config.TRITON_FAST_LAUNCH:
        return False
    try:
        version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (3, 6) <= version <= (3, 9)


_FAST_LAUNCH = _fast_launch_enabled()
_LAUNCHED: dict = {}  # launch key -> CompiledKernel
_MAX_LAUNCHED = 4096  # distinct launch keys kept (one per shape, dtype and config); beyond that the table restarts
_LAYOUTS: dict = {}  # id(kernel) -> its argument layout for the fast path (kernels are module globals, never freed)
_JIT_FUNCTION = triton.runtime.JITFunction
_DRIVER = triton.runtime.driver


def _arg_layout(kernel, args: tuple):
    """How _launch reads a kernel's arguments: (number of runtime parameters, getter of the integer arguments that
    select the binary, positions of the tensor arguments, names of the constexpr parameters); None when the kernel
    does not fit the fast path (a constexpr before a runtime parameter, or a runtime argument that is neither a
    tensor nor a number). Built from the first launch: every call site passes the same kinds at each position (a
    float stays a float: the callers pass float(...))."""
    layout = _LAYOUTS.get(id(kernel), False)
    if layout is not False:
        return layout
    params = kernel.params
    n_runtime = sum(not p.is_constexpr for p in params)
    layout = None
    if not any(p.is_constexpr for p in params[:n_runtime]) and len(args) == n_runtime:
        tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        # floats are never specialized (always fp32 arguments): like the per-call scalars, they do not select a binary
        ints = tuple(i for i, a in enumerate(args) if i not in tensors and params[i].name not in _PER_CALL_SCALARS
                     and not isinstance(a, float))
        if all(isinstance(args[i], int) for i in ints) and len(ints) >= 2:
            layout = (n_runtime, operator.itemgetter(*ints), tensors, tuple(p.name for p in params[n_runtime:]))
    _LAYOUTS[id(kernel)] = layout
    return layout


def _launch_hooks_set() -> bool:
    """Whether a launch hook is installed (triton keeps them in knobs.runtime as HookChains, empty by default)."""
    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs): runtime arguments positionally, constexprs and options by keyword."""
    layout = _arg_layout(kernel, args) if _FAST_LAUNCH and isinstance(kernel, _JIT_FUNCTION) else None
    if layout is None or len(args) != layout[0]:
        kernel[grid](*args, **kwargs)
        return
    driver = _DRIVER.active
    dev = driver.get_current_device()
    try:
        key = (id(kernel), dev, tuple(kwargs.items()), layout[1](args),
               tuple([(args[i].dtype, args[i].data_ptr() % 16 == 0) for i in layout[2]]))
        compiled = _LAUNCHED.get(key)
    except (AttributeError, TypeError):  # an argument of another kind than at the first launch: the JIT's path
        compiled = key = None
    if compiled is None or _launch_hooks_set():
        compiled = kernel[grid](*args, **kwargs)  # the JIT's path: compiles on first use, then launches
        if key is not None and getattr(compiled, "function", None) is not None:
            if len(_LAUNCHED) >= _MAX_LAUNCHED:
                _LAUNCHED.clear()
            _LAUNCHED[key] = compiled
        return
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(g0, g1, g2, driver.get_current_stream(dev), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *[kwargs[n] for n in layout[3]])


# Autotuned configs by problem key. The first call of a key runs triton's autotuner; later calls launch the JIT
# kernel with the chosen config directly, skipping the autotuner's own per-call work (tens of microseconds of host
# time per launch).
_TUNED: dict = {}


def _launch_tuned(key, tuner, kernel, grid, args, meta):
    """kernel[grid(config kwargs)](*args, **meta, **config): the tuned config for `key`, tuning on first use."""
    cfg = _TUNED.get(key)
    if cfg is None:  # the autotuner benchmarks the configs, then runs the best one: that is this call's launch
        tuner[grid](*args, **meta)
        _TUNED[key] = tuner.best_config
        return
    _launch(kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})


# ----------------------------------------------------------------------------------------------------------
# Arguments shared by the passes
# ----------------------------------------------------------------------------------------------------------
def _seed_arg(seed: int) -> int:
    """The 64-bit seed as a signed int64 with the same bits (for kernels that take the seed by value only)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def _seed_args(seed, like: torch.Tensor) -> tuple:
    """The kernels' (seed, seed_ptr, seed_in_mem) for a seed given as an int (passed by value: the 64 bits as a signed
    int64; ``like``, an input of the launch, fills the unused pointer) or as a 0-d int64 tensor on the device (read by
    the kernels at run time, through the pointer cast back to int64). The seed tensor is passed viewed in like's
    dtype, so that both forms give the kernel the same signature and select the same compiled binary: a CUDA graph
    captured after eager calls compiles nothing."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.reshape(1).view(like.dtype), 1
    return _seed_arg(seed), like, 0


def _partials(S: int, rows: int, cols: int, device) -> tuple:
    """(buffer, its 3 strides) for S fp32 partial sums of a (rows, cols) result that a kernel writes at
    pid * stride0: an (S, rows, cols) tensor, or with S == 1 the (rows, cols) result itself (no sum, no view)."""
    if S == 1:
        buf = torch.empty((rows, cols), dtype=torch.float32, device=device)
        return buf, (0, cols, 1)
    buf = torch.empty((S, rows, cols), dtype=torch.float32, device=device)
    return buf, (rows * cols, cols, 1)


def _sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum of the fp32 partials of ``_partials`` over the split dim (fixed order: deterministic), in `dtype`."""
    out = part.sum(0) if part.dim() == 3 else part
    return out if dtype == torch.float32 else out.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The passes
# ----------------------------------------------------------------------------------------------------------
def _launch_shrink(x, lora_A, u, scale, p, seed, offset, kn: TritonKnobs, split_k: bool):
    """u (M, r) = scale * (keep * x) @ A^T. With split_k, K is split so that about two programs per SM run
    (small M has too few M blocks to fill the GPU): the splits' fp32 partial sums go to an (S, M, r) buffer for
    the caller to add up. Returns (buffer, S); with S == 1 the buffer is u, already complete."""
    M, K = x.shape
    R = lora_A.shape[0]
    r_pad = _r_pad(R)
    BM, BK, warps = _helper_tiles(M, r_pad, kn)
    m_blocks, k_blocks = _cdiv(M, BM), _cdiv(K, BK)
    splits = 1
    if split_k:
        want = 2 if kn.interpret else 2 * _num_sms(x.device)
        splits = max(1, min(k_blocks, want // m_blocks))
    k_per_split = _cdiv(k_blocks, splits) * BK
    splits = _cdiv(K, k_per_split)
    out = u if splits == 1 else torch.empty((splits, M, R), dtype=torch.float32, device=x.device)
    s_us = 0 if splits == 1 else out.stride(0)
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)
    _launch(_shrink_kernel, (m_blocks, splits), (
        x, lora_A, out, M, K, R, k_per_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s_us, out.stride(-2), out.stride(-1),
        scale, keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K)),
        dict(HAS_DROPOUT=p > 0.0, W_T=False, R_PAD=r_pad, DOT_PREC=_dot_precision(x.dtype, kn),
             RANK_F32=_rank_f32(x, lora_A), BI=BM, BJ=BK, num_warps=warps,
             num_stages=_stages(BM * BK * x.element_size() + BK * r_pad * lora_A.element_size(), kn)))
    return out, splits


def _forward_small_m(x, weight, bias, lora_A, lora_B, u, y, scale, p, seed, offset, kn: TritonKnobs):
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = _r_pad(R)
    bm = max(16, _next_pow2(M))
    # Recomputing u in every program is free at small rank without dropout; otherwise u comes first (see kernel).
    # fp32 adapters on a 16-bit x: u comes from the shrink, which computes it in fp32.
    u_given = p > 0.0 or r_pad >= 64 or _rank_f32(x, lora_A)
    up, u_splits = u, 1
    if u_given:  # the partial sums are added up by the kernel below
        up, u_splits = _launch_shrink(x, lora_A, u, scale, p, seed, offset, kn, split_k=True)
        scale = 1.0
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)
    args = (x, weight, lora_A, lora_B, bias if bias is not None else y, u, up, y, M, N, K, R, u_splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1), M * R, y.stride(0), y.stride(1),
            scale, keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K))
    dot_prec = _dot_precision(x.dtype, kn)
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, R_PAD=r_pad, DOT_PREC=dot_prec,
                U_GIVEN=u_given, BM=bm)
    grid = lambda cfg: (_cdiv(N, cfg["BN"]), _cdiv(M, bm))  # noqa: E731
    elt, a_elt = x.element_size(), lora_A.element_size()
    if kn.interpret:
        _launch(_small_m_kernel, grid({"BN": 32}), args, dict(meta, BN=32, BK=32))
    elif not kn.autotune:
        cfg = _small_m_heuristic(N, bm, elt, a_elt, r_pad, u_given, _num_sms(x.device))
        _launch(_small_m_kernel, grid(cfg), args, {**meta, **cfg})
    else:
        key = ("small_m", bm, N, K, bias is not None, p > 0.0, r_pad, dot_prec, u_given, x.dtype, weight.dtype,
               lora_A.dtype, lora_B.dtype)
        _launch_tuned(key, _tuned_small_m(bm, elt, a_elt, r_pad, u_given), _small_m_kernel, grid, args, meta)


def _launch_gemm(a, b_strides, b, b_mat, l, lb_strides, lb, bias, c, N, K, R, lora_scale, p, seed, offset,
                 kn: TritonKnobs):
    """c (M, N) = a (M, K) @ b[k, n] + [keep] * lora_scale * l (M, R) @ lb[r, n] + bias.

    With the cuBLAS main loop, the kernel runs with no main K-steps (it writes the rank-r term and the bias) and
    cuBLAS then accumulates a @ b_mat into c with beta = 1 (c.addmm_), reading c in its epilogue.
    """
    M = a.shape[0]
    cublas = kn.cublas
    if cublas:
        K = 0
    r_pad = _r_pad(R)
    has_bias = bias is not None
    has_dropout = p > 0.0
    m_bucket = min(_next_pow2(M), 4096)
    seed_v, seed_p, seed_in_mem = _seed_args(seed, a)
    args = (a, b, l, lb, bias if has_bias else c, c, M, N, K, R,
            a.stride(0), a.stride(1), b_strides[0], b_strides[1], l.stride(0), l.stride(1),
            lb_strides[0], lb_strides[1], c.stride(0), c.stride(1),
            float(lora_scale), keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(N), m_bucket)
    dot_prec = _dot_precision(a.dtype, kn)
    meta = dict(HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PREC=dot_prec)
    grid = lambda cfg: (_cdiv(M, cfg["BM"]) * _cdiv(N, cfg["BN"]),)  # noqa: E731
    if kn.interpret:
        cfg = dict(BM=16, BN=32, BK=32, GROUP_M=4)
        _launch(_output_gemm_kernel, grid(cfg), args, {**meta, **cfg})
    elif cublas:
        # No main K-steps: a memory-bound write of c (plus the rank-r dot and, with dropout, the mask). One fixed
        # tile serves every shape near the memory bandwidth; tuning main-loop tiles for it would only cost compile
        # time on each new shape.
        cfg = _rank_term_config(r_pad)
        _launch(_output_gemm_kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})
    elif not kn.autotune:  # first config, no tuning (GPU tests)
        cfg = _gemm_configs(M <= 64, a.element_size(), r_pad)[0]
        _launch(_output_gemm_kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})
    else:
        key = ("gemm", M <= 64, m_bucket, N, K, has_bias, has_dropout, r_pad, dot_prec, a.dtype, b.dtype, l.dtype,
               lb.dtype)
        _launch_tuned(key, _tuned_gemm(M <= 64, a.element_size(), r_pad), _output_gemm_kernel, grid, args, meta)
    if cublas:
        c.addmm_(a, b_mat)


def _launch_shrink_t(w, rk, out_dtype, out_t, scale, p, seed, offset, r_pad, prec, rank_f32, kn: TritonKnobs):
    """The shrink of w^T: scale * ([keep *] w)^T @ rk (C, R), for w (M, C) and rk (M, R), the dropout mask being
    w's. dB from w = dy, rk = u; dA^T from w = x, rk = g, written as dA (R, C) when `out_t`. M is split into chunks
    that fill the GPU; each chunk writes fp32 partials, summed in a fixed order."""
    M, C = w.shape
    R = rk.shape[1]
    BM, BN, warps = _helper_tiles(M, r_pad, kn)
    n_blocks = _cdiv(C, BN)
    S, per = _splits(M, BM, n_blocks, w.device)
    if out_t:
        part, (s_os, s_or, s_oi) = _partials(S, R, C, w.device)
    else:
        part, (s_os, s_oi, s_or) = _partials(S, C, R, w.device)
    seed_v, seed_p, seed_in_mem = _seed_args(seed, w)
    _launch(_shrink_kernel, (n_blocks, S), (
        w, rk, part, C, M, R, per,
        w.stride(1), w.stride(0), rk.stride(1), rk.stride(0), s_os, s_oi, s_or,
        scale, keep_threshold(p), seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(C)),
        dict(HAS_DROPOUT=p > 0.0, W_T=True, R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BI=BN, BJ=BM,
             num_warps=warps, num_stages=_stages(BM * BN * w.element_size() + BM * r_pad * 4, kn)))
    return _sum_partials(part, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# The backend contract (lora_kernels/backends/__init__.py)
# ----------------------------------------------------------------------------------------------------------
def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    kn = _config.triton_knobs()
    u = torch.empty((M, R), dtype=torch.float32, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, u
    if M <= SMALL_M and K > 0 and N > 0:
        _forward_small_m(x, weight, bias, lora_A, lora_B, u, y, float(scaling) / (1.0 - float(p)), p, seed, offset, kn)
        return y, u
    if K == 0:
        u.zero_()
    else:
        _launch_shrink(x, lora_A, u, float(scaling) / (1.0 - float(p)), p, seed, offset, kn, split_k=False)  # 1 split
    if N == 0:
        return y, u
    # y = x @ W^T + u @ B^T + b: b operand W^T[k, n] = W[n, k]; lb operand B^T[r, n] = B[n, r]
    _launch_gemm(x, (weight.stride(1), weight.stride(0)), weight, weight.t(), u, (lora_B.stride(1), lora_B.stride(0)),
                 lora_B, bias, y, N, K, R, 1.0, 0.0, seed, offset, kn)
    return y, u


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    dx = torch.empty((M, K), dtype=x.dtype, device=dev) if need_dx else None
    dA = dB = None
    if M == 0 or N == 0 or K == 0:
        if need_dx:
            dx.zero_()
        if need_dA:
            dA = torch.zeros((R, K), dtype=lora_A.dtype, device=dev)
        if need_dB:
            dB = torch.zeros((N, R), dtype=lora_B.dtype, device=dev)
        return dx, dA, dB

    kn = _config.triton_knobs()
    r_pad = _r_pad(R)
    prec = _dot_precision(x.dtype, kn)
    rank_f32 = _rank_f32(x, lora_A, lora_B)
    scale = float(scaling) / (1.0 - float(p))

    g = None
    if need_dx or need_dA:
        BM, BN, warps = _helper_tiles(M, r_pad, kn)
        g = torch.empty((M, R), dtype=torch.float32, device=dev)
        m_blocks = _cdiv(M, BM)
        # fuse dB into the g pass when the per-M-block partial buffer is small next to dy (2r/BM of it)
        fuse_db = need_dB and m_blocks * N * R * 4 <= _FUSE_DB_PARTIAL_RATIO * M * N * dy.element_size()
        dbp, dbp_s = _partials(m_blocks, N, R, dev) if fuse_db else (g, (0, 0, 0))
        _launch(_dy_pass_kernel, (m_blocks,), (
            dy, lora_B, u, g, dbp, M, N, R,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1),
            g.stride(0), g.stride(1), *dbp_s),
            dict(NEED_DB=fuse_db, R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BM=BM, BN=BN, num_warps=warps,
                 num_stages=_stages(BM * BN * dy.element_size() * (2 if fuse_db else 1)
                                    + BN * r_pad * lora_B.element_size() + (BM * r_pad * 4 if fuse_db else 0), kn)))
        if fuse_db:
            dB = _sum_partials(dbp, lora_B.dtype)
    if need_dB and dB is None:  # dB = dy^T u: no mask (p = 0), no scale
        dB = _launch_shrink_t(dy, u, lora_B.dtype, False, 1.0, 0.0, seed, offset, r_pad, prec, rank_f32, kn)
    if need_dA:  # dA = s/q * g^T (keep * x), the transpose of s/q * (keep * x)^T g
        dA = _launch_shrink_t(x, g, lora_A.dtype, True, scale, p, seed, offset, r_pad, prec, rank_f32, kn)
    if need_dx:
        # dx = dy @ W + keep * s/q * (g @ A): b operand W[n, k] (rows = reduction dim n); lb operand A[r, k]
        _launch_gemm(dy, (weight.stride(0), weight.stride(1)), weight, weight, g, (lora_A.stride(0), lora_A.stride(1)),
                     lora_A, None, dx, K, N, R, scale, p, seed, offset, kn)
    return dx, dA, dB
