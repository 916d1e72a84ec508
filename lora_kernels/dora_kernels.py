"""The element-wise passes and the row-norm kernels of the DoRA op (``lora_kernels.dora``), around the LoRA
backends' forward/backward.

Each pass reads its inputs once and rounds once; math in float32 (float64 for float64 inputs):

    scale_bias(z, c, bias, out=)        -> c ⊙ z + b                           per-column scale c (N,); out=z:
                                                                               in place
    scale_colsum(dy, z, c, out=)        -> (c ⊙ dy, Σ_m dy ⊙ z)                 the magnitude grad's reduction,
                                                                               fused with the pass that scales dy;
                                                                               out=z: c ⊙ dy written over z;
                                                                               from_y: z = (y − b)/c from y
    zero_g_colsum(dg, dy, x, W, u, A, B, s, g, wsq, bias)
                                        -> dg_n = Σ_m dy ⊙ z where y cannot     g_n = 0, a bias and |g_n| < 1/2, or
                                           give z (z_lost_from_y)               ‖s·(B A)_n‖ > ‖W_n‖ / 2; plain
                                                                               PyTorch (the fast path is
                                                                               scale_colsum's recompute=)
    masked(t, p, seed, offset, ak, ad, base=None)
                                        -> base + where(keep, ak·t, ad·t)       keep = the contract's dropout mask
    w_at(W, A)                          -> W Aᵀ (N, r) float32                  Triton only: one pass over W
    weight_norm(W, A, B, s, wsq)        -> ‖W + s·B A‖_row (N,) from ‖W_n‖²     Triton only (w_at + one combine)

``fast=True`` runs Triton kernels (on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1): one pass and no
temporary. The kernels are the Triton backend's, one file per pass (``lora_kernels/backends/triton/kernels/``,
``dora_*.py``); this module plans and launches them. ``fast=False`` is plain PyTorch (the torch backend's reference,
and the fallback where Triton cannot run); it materialises float32 temporaries of the tensors' size. The column sums
are deterministic: each (column block, row split) program writes a partial sum, and the partials are summed with
torch in a fixed order.

Names used from ``lora_kernels.backends.triton`` besides the kernels: ``_num_sms``, ``_seed_args``, the
shared-memory budget, and ``_launch`` (the triton backend's launch, with its fast relaunch that skips the JIT's
per-call argument binding: tens of microseconds of host time per launch).
"""
from __future__ import annotations

import torch

from . import _config
from .philox import calls_per_row, keep_threshold
from .philox import dropout_mask as _ref_mask

try:
    import triton

    from .backends.triton import _HOPPER_SMEM, _launch, _max_smem, _num_sms, _seed_args, _smem_per_block
    from .backends.triton.configs import _ELEMENTWISE_TILES
    from .backends.triton.kernels.dora_colsum import _scale_colsum_kernel
    from .backends.triton.kernels.dora_masked import _masked_kernel
    from .backends.triton.kernels.dora_norm import _norm_combine_kernel
    from .backends.triton.kernels.dora_scale_bias import _scale_bias_kernel
    from .backends.triton.kernels.dora_w_at import _w_at_kernel
    from .backends.triton.kernels.dora_zero_g import _colsum_finish_kernel, _zero_g_colsum_kernel
except Exception:  # no triton here: only the PyTorch versions run
    triton = None


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton versions can run on tensors of ``device``: the triton backend is available (cached by
    ``_dispatch``) and the tensors are on CUDA or the interpreter runs."""
    from . import _dispatch

    if triton is None or _dispatch.get("triton") is None:
        return False
    return device.type == "cuda" or _config.TRITON_INTERPRET


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interp(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _row_splits(M: int, BM: int, want: int):
    """(rows per split, splits) of a column pass over M rows in BM-row tiles, into at most ``want`` row splits of
    whole tiles (each writes a partial of its column sums)."""
    tiles = _cdiv(M, BM)
    rows = _cdiv(tiles, max(1, min(want, tiles))) * BM
    return rows, _cdiv(M, rows)


_W_AT_TILES = {}  # (r_pad, mode) -> (BN, BK, num_warps), overridable for measurements


def _w_at_tiles(r_pad: int, mode: int):
    """(BN, BK, num_warps) of ``_w_at_kernel`` on GPUs: the (BN, R_PAD) float32 accumulator and, for 3xTF32, the
    split operands stay in registers (checked for sm_90 by tests/test_dora_sm90.py: no spills)."""
    if (r_pad, mode) in _W_AT_TILES:
        return _W_AT_TILES[r_pad, mode]
    if mode == 3:  # 3xTF32 keeps hi/lo copies of both operands
        return (64, 32, 4) if r_pad <= 32 else ((64, 32, 8) if r_pad <= 64 else (32, 32, 8))
    return (64, 64, 4) if r_pad <= 64 else (32, 64, 8)


def w_at(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W Aᵀ (N, r) in float32, one Triton pass over W (A's columns stream beside it, from L2). Products at float32
    accuracy: exact 16-bit products for 16-bit W and A, an exact three-piece bf16 split of a float32 A on a bf16 W,
    3xTF32 for float32 operands (float32 "ieee" under the interpreter). W and A must have unit stride along K."""
    N, K = weight.shape
    R = lora_A.shape[0]
    r_pad = max(16, 1 << (R - 1).bit_length())
    interp = _interp(weight)
    if weight.dtype == lora_A.dtype and weight.dtype != torch.float32:
        mode = 1
    elif weight.dtype == torch.bfloat16:
        mode = 2
    else:
        mode = 3
    BN, BK, warps = (16, 32, 4) if interp else _w_at_tiles(r_pad, mode)
    meta = dict(MODE=mode, WIDEN=interp, R_PAD=r_pad, BN=BN, BK=BK, num_warps=warps)
    smem = _HOPPER_SMEM if interp else _smem_per_block(weight.device)
    if smem < _HOPPER_SMEM:  # the tiles are sized for a Hopper block: on a smaller one the pipeline is cut to fit
        per_stage = (BN * weight.element_size() + r_pad * lora_A.element_size()) * BK
        meta["num_stages"] = max(1, min(3, _max_smem(smem) // per_stage))
    n_blocks = _cdiv(N, BN)
    want = 1 if interp else max(1, 2 * _num_sms(weight.device) // n_blocks)
    per = _cdiv(_cdiv(K, BK), max(1, min(want, _cdiv(K, BK)))) * BK
    splits = max(1, _cdiv(K, per))
    part = torch.empty((splits, N, R), dtype=torch.float32, device=weight.device)
    _launch(_w_at_kernel, (n_blocks, splits),
            (weight, lora_A, part, N, K, R, per, weight.stride(0), lora_A.stride(0)), meta)
    return part


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                wsq: torch.Tensor, aat=None) -> torch.Tensor:
    """‖W + scaling · B A‖ per row (N,) in float32 from ‖W_n‖² (``wsq``, float32, cached by the caller):
    ‖W_n‖² + 2s·B_n·(A W_nᵀ) + s²·B_n (A Aᵀ) B_nᵀ, with W Aᵀ from ``w_at`` (the one pass over W), A Aᵀ as a
    float32 GEMM of r×r, and one combine kernel that forms the quadratic form B_n (A Aᵀ) B_nᵀ itself, and sums the
    rows where the adapter cancels much of W_n again directly from W and A (the expansion loses precision there).
    No N×K temporary. W and A must have unit stride along K. ``aat``: A Aᵀ when the caller has it (``adapter_gram``)."""
    N = weight.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.float32, device=weight.device)
    R = lora_A.shape[0]
    part = w_at(weight, lora_A)
    if aat is None:
        aat = adapter_gram(lora_A)  # (r, r) float32; B (A Aᵀ) Bᵀ per row in the combine kernel
    out = torch.empty(N, dtype=torch.float32, device=weight.device)
    r_pad = max(16, 1 << (R - 1).bit_length())
    # tiles that keep (BN, R_PAD) float32 tiles and the dot's operands in registers on sm_90 (no spills:
    # tests/test_dora_sm90.py)
    BN = 16 if _interp(weight) else max(16, min(64, 1024 // r_pad))
    _launch(_norm_combine_kernel, (_cdiv(N, BN),),
            (part, wsq, lora_B, aat, weight, lora_A, out, N, weight.shape[1], R, part.shape[0], lora_B.stride(0),
             weight.stride(0), lora_A.stride(0), float(scaling)),
            dict(R_PAD=r_pad, BN=BN, BJ=min(r_pad, 32 if r_pad <= 64 else 16), BR=min(r_pad, 64), BK=16,
                 num_warps=4 if r_pad <= 64 else 8))
    return out


def _tiles(t: torch.Tensor):
    return (16, 32) if _interp(t) else _ELEMENTWISE_TILES


def _tiled(t: torch.Tensor, out):
    """For an elementwise kernel over the (M, N) t: (out, or a new tensor like t when None; the grid of _tiles(t)
    blocks, None when t is empty: nothing to launch; the tile sizes)."""
    M, N = t.shape
    if out is None:
        out = torch.empty_like(t)
    BM, BN = _tiles(t)
    return out, ((_cdiv(M, BM), _cdiv(N, BN)) if M and N else None), BM, BN


def scale_bias(z: torch.Tensor, c: torch.Tensor, bias, fast: bool, out=None) -> torch.Tensor:
    """``c ⊙ z + bias`` (z (M, N) contiguous, c (N,) float32/64, bias (N,) or None), in z's dtype; ``out=z``
    writes it over z."""
    if not fast:
        acc = _acc(z)
        y = z.to(acc) * c.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        return y.to(z.dtype) if out is None else out.copy_(y)
    M, N = z.shape
    out, grid, BM, BN = _tiled(z, out)
    if grid is not None:
        _launch(_scale_bias_kernel, grid,
                (z, c, bias if bias is not None else c, out, M, N, z.stride(0), out.stride(0)),
                dict(HAS_BIAS=bias is not None, BM=BM, BN=BN))
    return out


def scale_colsum(dy: torch.Tensor, z, c: torch.Tensor, need_out: bool, need_sum: bool, fast: bool, out=None,
                 from_y: bool = False, bias=None, recompute=None, aat=None):
    """(``c ⊙ dy`` in dy's dtype or None, ``Σ_m dy ⊙ z`` (N,) in float32/64 or None); one pass over dy and z.
    ``out`` (optional, may be z itself: each tile of z is read before its c ⊙ dy is written) receives c ⊙ dy.
    ``from_y``: ``z`` holds y = c ⊙ z + bias instead (p = 0, c = g), and the sum is Σ_m dy ⊙ (y − bias) / c,
    0 where c = 0. ``recompute`` (with ``from_y``): (x, W, u, lora_A, lora_B, scaling, wsq), and the columns that y
    cannot give z take ``zero_g_colsum``'s sums instead; on the fast path its partials share the colsum's buffer and
    one finish launch sums both (the launches of a backward without such a column: the colsum, the recompute's test,
    the finish). ``aat``: A Aᵀ when the caller has it (the forward's norm computed it), else computed here."""
    acc = _acc(dy)
    M, N = dy.shape
    if not fast:
        d = dy.to(acc)
        colsum = None
        if need_sum:
            zz = z.to(acc) - (bias.to(acc) if (from_y and bias is not None) else 0.0)
            colsum = (d * zz).sum(0)
            if from_y:
                cc = c.to(acc)
                colsum = torch.where(cc != 0, colsum / torch.where(cc != 0, cc, torch.ones_like(cc)),
                                     torch.zeros_like(colsum))
            if from_y and recompute is not None:
                x, weight, u, lora_A, lora_B, scaling, wsq = recompute
                zero_g_colsum(colsum, dy, x, weight, u, lora_A, lora_B, scaling, c, wsq, bias)
        if not need_out:
            return None, colsum
        scaled = d * c.to(acc)
        return (scaled.to(dy.dtype) if out is None else out.copy_(scaled)), colsum
    if need_out and out is None:
        out = torch.empty_like(dy)
    if M == 0 or N == 0 or not (need_out or need_sum):
        return (out if need_out else None), (torch.zeros(N, dtype=acc, device=dy.device) if need_sum else None)
    BM, BN = _tiles(dy)
    n_blocks = _cdiv(N, BN)
    want = 1 if _interp(dy) else max(1, 2 * _num_sms(dy.device) // n_blocks)  # about two programs per SM
    rows, splits = _row_splits(M, BM, want)
    rz = None  # the recompute's plan, where its partials join the colsum's
    if recompute is not None and from_y and need_sum:
        rz = _zero_g_plan(recompute[0], N, recompute[4].shape[1])
    n_rows = splits + (rz[0] + 1 if rz is not None else 0)  # the colsum's partials, the recompute's, its flags
    part = torch.empty((n_rows, N), dtype=torch.float32, device=dy.device) if need_sum else c
    has_bias = bool(from_y and need_sum and bias is not None)
    _launch(_scale_colsum_kernel, (n_blocks, splits),
            (dy, z if need_sum else dy, c, bias if has_bias else c, out if need_out else dy, part, M, N, rows,
             dy.stride(0), z.stride(0) if need_sum else 0, out.stride(0) if need_out else 0),
            dict(NEED_OUT=need_out, NEED_SUM=need_sum, FROM_Y=bool(from_y and need_sum), HAS_BIAS=has_bias,
                 BM=BM, BN=BN))
    if rz is None:
        return (out if need_out else None), (part.sum(0) if need_sum else None)
    x, weight, u, lora_A, lora_B, scaling, wsq = recompute
    _launch_zero_g(part, splits, rz, dy, x, weight, u, lora_A, lora_B, scaling, c, wsq, bias,
                   adapter_gram(lora_A) if aat is None else aat)
    colsum = torch.empty(N, dtype=torch.float32, device=dy.device)
    _launch(_colsum_finish_kernel, (_cdiv(N, _FINISH_COLS),), (part, colsum, N, splits, splits, rz[0], splits + rz[0]),
            dict(BN=_FINISH_COLS))
    return (out if need_out else None), colsum


# DoRA at p = 0 takes z = (y − b)/g from the output y. y is rounded at the scale of max(|g z|, |b|), so z's error grows
# as |b|/|g| where |g| is small; PEFT's base_result − bias is not divided by g. And y's LoRA part went through the
# output GEMM's 16-bit operands (s·u and B rounded to x's dtype), where PEFT keeps that part in the adapters' float32:
# where the adapter's row s·(B A)_n is large against W_n, z dominated by the LoRA part, or the two cancelling, carries
# that rounding at the LoRA part's scale, not the base's (up to 100× PEFT's error in a fuzz at K ≤ 3 or s ≥ 250).
# So these columns recompute z from x, W, u and B (zero_g_colsum): g = 0 (y = b: z is lost); a bias and
# |g| < Z_FROM_Y_MIN_G (z's error past 2× PEFT's); ‖s·(B A)_n‖ > Z_FROM_Y_MAX_ADAPTER·‖W_n‖, measured as
# s²·B_n (A Aᵀ) B_nᵀ against ‖W_n‖². DoRA starts at g = 1 with B = 0, and training keeps g near 1 and the adapter
# small against W, so this is for unusual inputs. csrc/common.cuh's dora_recompute_z is the same rule.
Z_FROM_Y_MIN_G = 0.5
Z_FROM_Y_MAX_ADAPTER = 0.5
# zero_g_colsum's (BM, BN, BK, num_warps): a GEMM tile loop where a column block has a flagged column (tensor-core
# dots for 16-bit x; float32 "ieee" dots for float32 x and in the interpreter, whose bf16 dots are wrong)
_ZERO_G_TILES = {"16bit": (64, 128, 64, 8), "ieee": (64, 64, 32, 8), "interp": (16, 16, 16, 4)}
_FINISH_COLS = 256  # columns per program of the finish launch, which sums a column's row-split partials


def adapter_gram(lora_A: torch.Tensor) -> torch.Tensor:
    """A Aᵀ (r, r) in float32 (float64 for float64 A): the Gram matrix of the rank-r rows, from which
    ``‖s·(B A)_n‖² = s²·B_n (A Aᵀ) B_nᵀ`` costs O(r²) per row."""
    a = lora_A.detach().to(_acc(lora_A))
    return a @ a.t()


def z_lost_from_y(g: torch.Tensor, bias, lora_B: torch.Tensor, aat: torch.Tensor, scaling: float,
                  wsq: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the columns whose z the saved-y backward recomputes rather than takes from y (``aat`` = A Aᵀ,
    ``wsq`` = ‖W_n‖²)."""
    lost = g == 0
    if bias is not None:
        lost = lost | ((bias != 0) & (g.abs() < Z_FROM_Y_MIN_G))
    b = lora_B.detach().to(aat.dtype)
    adapter_sq = ((b @ aat) * b).sum(1) * (float(scaling) * float(scaling))  # inf past float's range, no raise
    return lost | (adapter_sq > (Z_FROM_Y_MAX_ADAPTER ** 2) * wsq.to(aat.dtype))


def zero_g_colsum(dg: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                  lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, g: torch.Tensor, wsq: torch.Tensor,
                  bias=None) -> torch.Tensor:
    """Writes ``dg_n = Σ_m dy_mn z_mn`` for the columns that y cannot give z accurately (``z_lost_from_y``: g_n = 0,
    a bias and a small g_n, or an adapter row large against W_n's norm ``wsq``), z = x Wᵀ + u Bᵀ; ``dg`` elsewhere is
    left alone. Plain PyTorch (the reference backends): z of every column recomputed, then selected. The fast path
    is ``scale_colsum(..., recompute=)``: a GEMM tile loop over (column block, row split) programs that return once
    they have found no such column among theirs (no synchronisation), its partials summed with the colsum's by one
    finish launch."""
    if x.shape[0] == 0 or weight.shape[0] == 0:
        return dg
    acc = dg.dtype
    z = x.to(acc) @ weight.to(acc).t() + u.to(acc) @ lora_B.to(acc).t()
    lost = z_lost_from_y(g, bias, lora_B, adapter_gram(lora_A), scaling, wsq)
    return dg.copy_(torch.where(lost, (dy.to(acc) * z).sum(0), dg))


def _zero_g_plan(x: torch.Tensor, N: int, R: int):
    """(row splits, rows per split, (BM, BN, BK, num_warps), IEEE) of the recompute's launch for x (M, K)."""
    M = x.shape[0]
    ieee = _interp(x) or x.dtype == torch.float32  # 16-bit x on the GPU: tensor-core dots (exact products)
    tiles = _ZERO_G_TILES["interp" if _interp(x) else ("ieee" if ieee else "16bit")]
    BM, BN = tiles[0], tiles[1]
    want = max(1, 2 * _num_sms(x.device) // _cdiv(N, BN))  # about two programs per SM (the interpreter's 4 too)
    rows, splits = _row_splits(M, BM, want)
    return splits, rows, tiles, ieee


def _launch_zero_g(part, row0: int, plan, dy, x, weight, u, lora_A, lora_B, scaling, g, wsq, bias, aat) -> None:
    """The recompute's launch: its partials into rows row0.. of part (N columns), its flags (1.0 where a column
    recomputes) into the row after them (aat = A Aᵀ, for the flag of an adapter row large against W's)."""
    M, K = x.shape
    N, R = lora_B.shape
    splits, rows, (BM, BN, BK, warps), ieee = plan
    r_pad = max(16, 1 << (R - 1).bit_length())
    _launch(_zero_g_colsum_kernel, (_cdiv(N, BN), splits),
            (x, weight, u, lora_B, aat, wsq, g, g if bias is None else bias, dy, part, M, K, N, R, rows, row0,
             row0 + splits, x.stride(0), weight.stride(0), u.stride(0), lora_B.stride(0), dy.stride(0),
             Z_FROM_Y_MIN_G, float(scaling) * float(scaling), Z_FROM_Y_MAX_ADAPTER ** 2),
            dict(HAS_BIAS=bias is not None, IEEE=ieee, R_PAD=r_pad, BR=16, BM=BM, BN=BN, BK=BK, num_warps=warps))


def masked(t: torch.Tensor, p: float, seed, offset: int, a_keep: float, a_drop: float, fast: bool,
           base=None, out=None) -> torch.Tensor:
    """``base + where(keep, a_keep·t, a_drop·t)`` in t's dtype, keep = dropout_mask(seed, offset, t.shape, p)
    for the flattened (M, K) t; ``seed`` an int, or a 0-d int64 device tensor (CUDA graph capture) read when the
    pass runs. ``out`` may be ``base`` or ``t`` (in place)."""
    M, K = t.shape
    if not fast:
        acc = _acc(t)
        keep = _ref_mask(seed, offset, (M, K), p, device=t.device)
        t32 = t.to(acc)
        r = torch.where(keep, t32 * a_keep, t32 * a_drop)
        if base is not None:
            r = r + base.to(acc)
        if out is None:
            return r.to(t.dtype)
        return out.copy_(r)
    out, grid, BM, BK = _tiled(t, out)
    if grid is not None:
        seed_v, seed_p, seed_in_mem = _seed_args(seed, t)
        _launch(_masked_kernel, grid,
                (t, base if base is not None else t, out, M, K, t.stride(0),
                 base.stride(0) if base is not None else 0, out.stride(0), float(a_keep), float(a_drop),
                 seed_v, seed_p, seed_in_mem, int(offset), calls_per_row(K), keep_threshold(p)),
                dict(HAS_BASE=base is not None, BM=BM, BK=BK))
    return out
