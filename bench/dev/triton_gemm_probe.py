"""Does a Triton main loop reach cuBLAS on the frozen GEMM y = x Wᵀ? A development probe for the GEMM issue.

    python3 bench/dev/triton_gemm_probe.py [--M 2048,8192] [--shapes 4096x4096,4096x1024] [--dtypes bf16,fp16]
                                           [--variants plain,tma_persistent,tma_persistent_ws] [--quick]
                                           [--reps 20] [--out results.json]
    TRITON_INTERPRET=1 python3 bench/dev/triton_gemm_probe.py --smoke     # CPU, no GPU: the kernels interpreted

The problem is the base GEMM of a LoRA layer: y (M, N) = x (M, K) @ W(N, K)ᵀ, W row-major (N, K) as nn.Linear
stores it, bf16 or fp16 inputs, fp32 accumulation, y in the input dtype. Shapes (K -> N): the four Llama-3-8B
projections 4096->4096, 4096->1024, 4096->14336, 14336->4096, at M = 2048 and 8192 tokens.

Three Triton kernels, each its own @triton.jit function:
  plain              the classic non-persistent blocked-pointer matmul (one program per output tile, grouped tile
                     order, masked pointer loads): the baseline.
  tma_persistent     one program per SM walking the output tiles (grouped order), x and W tiles loaded through
                     tensor descriptors (TMA on Hopper), the tile loop flattened so that the next tile's loads overlap
                     this tile's epilogue, y stored through a descriptor.
  tma_persistent_ws  the same with Triton's automatic warp specialisation (tl.range(..., warp_specialize=True)):
                     on the K loop (configs "..._wsk"), or on the tile loop (configs "..._wst", the placement of
                     Triton's persistent-matmul tutorial), 4 warps, not flattened: on sm_90 Triton specialises only
                     then (see WS_BASE). The report marks the kernels that came out specialised "(WS)".
Descriptors are built on the host (triton.tools.tensor_descriptor.TensorDescriptor) first; where that fails to
compile or run, on the device (tl.make_tensor_descriptor, scratch from triton.set_allocator) (--desc auto).

Each config is compiled explicitly (no triton.autotune; M, N and K are runtime ints, so one compile per config and
dtype serves every shape), then:
1. Correctness, per (variant, config, dtype): the first shape at M = 2048 and an odd shape (M = 300, 4096 -> 1000),
   y pre-filled with NaN (an unwritten element shows), relative Frobenius error against a float64 reference at most
   2x that of torch's same-dtype F.linear (+ 1e-6). A config that fails (or does not compile or run) is reported and
   left out of the timing. On a GPU the checks run in a child process (unless --no-isolate): a kernel that
   crashes the process, breaks the CUDA context or hangs is blamed, left out, and the checks go on in a fresh child
   after it.
2. Speed, per (shape, M, dtype): cuBLAS (F.linear(x, W)) and every passing config, timed in the same run in the
   burst regime of bench/suite/timing.py (_gpu_time: a batch of calls queued behind a GPU sleep, CUDA events around
   the batch), candidates interleaved round by round (the order rotating) so that clock drift reaches all alike,
   input sets rotated to exceed 2x L2 where one set fits in it. A short screen of every config picks the best per
   variant, then cuBLAS and those picks are timed again (--reps rounds): medians of GPU time, TFLOP/s = 2MNK / t,
   ratio = cuBLAS time / ours (> 1: ours faster).
Prints a markdown table, the per-variant geomean of the ratio over all cells with the worst cell, and whether each
variant reaches >= 0.95x; --out writes every row, the checks, the GPU, torch/triton versions and every error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:  # host-side descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

HAS_DEVICE_DESC = hasattr(tl, "make_tensor_descriptor")

_SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "suite")
sys.path.insert(0, _SUITE)
try:
    import timing  # bench/suite/timing.py: _gpu_time (the burst regime), n_rotation_sets
finally:
    sys.path.remove(_SUITE)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
CHECK_M = 2048  # the first shape is checked at this M
ODD_SHAPE = "300x4096x1000"  # MxKxN: partial tiles in M and N
TARGET = 0.95  # the bar: geomean of cuBLAS time / ours


# ------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of an output tile in grouped order: the tiles are numbered band by band, a band being GROUP_M
    rows of tiles, and down the rows of a band before across its columns. Tiles that run at the same time then share
    a few W column blocks and x row blocks, which stay in L2, instead of sweeping all of x for every column block."""
    tiles_per_band = GROUP_M * num_pid_n
    band = tile_id // tiles_per_band
    first_m = band * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)  # the last band may be short
    local = tile_id - band * tiles_per_band
    return first_m + local % rows, local // rows


@triton.jit
def plain_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[m, n] = sum_k x[m, k] W[n, k]: one program per (BLOCK_M, BLOCK_N) tile of y, pointer loads (the
    compiler's software pipeline, num_stages, turns them into asynchronous copies), fp32 accumulator."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Rows of x and W past the edge read row 0 instead (their results land in masked-off elements of y), so the
    # loads need a mask along K only, which keeps them vectorised.
    x_rows = tl.where(rows < M, rows, 0)
    w_rows = tl.where(cols < N, cols, 0)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + ks[None, :]  # a (BLOCK_N, BLOCK_K) tile of W, K contiguous
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks[None, :] < K - k0  # zero-fill the K tail
        a = tl.load(x_ptrs, mask=k_ok, other=0.0)
        b = tl.load(w_ptrs, mask=k_ok, other=0.0)
        acc = tl.dot(a, b.T, acc)  # W's tile transposed: (BLOCK_K, BLOCK_N)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# M, N and K only count tiles (and size device-side descriptors) in the TMA kernels: not specialised on, so the odd
# check shape reuses the timed shapes' binary.
@triton.jit(do_not_specialize=["M", "N", "K"])
def tma_persistent_kernel(x, w, y, M, N, K,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
                          DEVICE_DESC: tl.constexpr):
    """Persistent: program p computes tiles p, p + NUM_SMS, ... . x, w and y are tensor descriptors built on the
    host, or (DEVICE_DESC) the tensors themselves, described here. TMA loads out-of-range elements as zero and
    clips stores at the edges, so partial tiles need no masks."""
    if DEVICE_DESC:
        x_desc = tl.make_tensor_descriptor(x, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        y_desc = tl.make_tensor_descriptor(y, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    else:
        x_desc = x
        w_desc = w
        y_desc = y
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    start = tl.program_id(0)
    # The store's coordinates come from a second counter, not from tile_id: once the loop nest is flattened, the
    # pipeliner issues the next tile's loads (and so advances tile_id) before this tile's store, and a counter of
    # the epilogue's own keeps one value from having to live across both ends of the pipeline (as Triton's
    # persistent-matmul tutorial does).
    tile_out = start - NUM_SMS
    # FLATTEN fuses the tile loop and the K loop into one pipelined loop (the prologue of tile i+1 overlaps the
    # epilogue of tile i); num_stages (a launch option) sets the depth of its load pipeline.
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        tile_out += NUM_SMS
        out_m, out_n = _tile_coords(tile_out, num_pid_m, num_pid_n, GROUP_M)
        y_desc.store([out_m * BLOCK_M, out_n * BLOCK_N], acc.to(y_desc.dtype))


@triton.jit(do_not_specialize=["M", "N", "K"])
def tma_persistent_ws_kernel(x, w, y, M, N, K,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
                             DEVICE_DESC: tl.constexpr, WS_TILE_LOOP: tl.constexpr, WS_K_LOOP: tl.constexpr):
    """tma_persistent_kernel with automatic warp specialisation: the compiler splits the specialised loop into a
    producer partition (TMA loads into a ring of shared-memory buffers) and consumer warps (the MMAs, and the
    epilogue), which synchronise through barriers instead of the software pipeline's waits. WS_K_LOOP specialises
    the K loop of each tile; WS_TILE_LOOP the persistent tile loop (the producer then runs ahead across tiles)."""
    if DEVICE_DESC:
        x_desc = tl.make_tensor_descriptor(x, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        y_desc = tl.make_tensor_descriptor(y, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    else:
        x_desc = x
        w_desc = w
        y_desc = y
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    start = tl.program_id(0)
    tile_out = start - NUM_SMS
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS_TILE_LOOP):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in tl.range(k_tiles, warp_specialize=WS_K_LOOP):
            a = x_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        tile_out += NUM_SMS
        out_m, out_n = _tile_coords(tile_out, num_pid_m, num_pid_n, GROUP_M)
        y_desc.store([out_m * BLOCK_M, out_n * BLOCK_N], acc.to(y_desc.dtype))


# ------------------------------------------------------------------------------------------------------ launch
@dataclass(frozen=True)
class Cfg:
    bm: int
    bn: int
    bk: int
    stages: int
    warps: int
    group_m: int = 8
    flatten: bool = False
    ws: str = ""  # tma_persistent_ws only: "k" (the K loop) or "tile" (the tile loop)

    @property
    def name(self) -> str:
        s = f"{self.bm}x{self.bn}x{self.bk}_s{self.stages}_w{self.warps}"
        if self.flatten:
            s += "_flat"
        return s + {"": "", "k": "_wsk", "tile": "_wst"}[self.ws]


# 128x256 and 256x128 at 3 stages: 3 x 48 KiB of operand buffers + a 64 KiB epilogue tile fit in 227 KiB
BASE = [Cfg(128, 256, 64, 3, 8), Cfg(256, 128, 64, 3, 8), Cfg(128, 128, 64, 4, 8), Cfg(128, 128, 64, 4, 4)]
QUICK = [BASE[0], BASE[3]]


def _with(c: Cfg, **kw) -> Cfg:
    return Cfg(**{**asdict(c), **kw})


# Warp specialisation on sm_90 (Triton's Hopper pass, as compiled for sm_90a by triton 3.6 and 3.9): it applies
# only at num_warps = 4 on a loop that is not flattened, and the kernel then runs 12 warps (a producer warp group
# with few registers, two consumer warp groups with many); at num_warps = 8, or flattened, the loop is left as it
# is. Hence 4 warps and no flatten here. Both placements compiled to the same kernel there (the pass specialises the
# tile loop either way): the K loop on every tile shape, the tile loop on one. With host-side descriptors the pass
# fails to compile (--desc auto falls back to device-side ones). Each check records whether the kernel is
# specialised (kernel_info).
WS_BASE = [Cfg(128, 256, 64, 3, 4), Cfg(256, 128, 64, 3, 4), Cfg(128, 128, 64, 4, 4)]
VARIANT_CONFIGS = {
    "plain": (BASE, QUICK),
    "tma_persistent": ([_with(c, flatten=True) for c in BASE], [_with(c, flatten=True) for c in QUICK]),
    "tma_persistent_ws": ([_with(c, ws="k") for c in WS_BASE] + [_with(WS_BASE[0], ws="tile")],
                          [_with(WS_BASE[0], ws="k"), _with(WS_BASE[2], ws="k")]),
}
VARIANTS = list(VARIANT_CONFIGS)
TMA_VARIANTS = ("tma_persistent", "tma_persistent_ws")


def configs_for(variant: str, quick: bool):
    full, short = VARIANT_CONFIGS[variant]
    return short if quick else full


def tma_unsupported(M, N, K, dtype) -> str | None:
    """Why TMA cannot describe x (M, K), W (N, K) and y (M, N), or None: every row stride must be a multiple of
    16 bytes (base addresses are: fresh allocations)."""
    es = torch.empty((), dtype=dtype).element_size()
    bad = [f"{name} row stride {n * es} B" for name, n in (("x/W", K), ("y", N)) if (n * es) % 16]
    return ("TMA needs 16-byte row strides: " + ", ".join(bad)) if bad else None


_ALLOCATOR_SET = [False]


def _ensure_allocator(device):
    """Device-side descriptors live in global scratch that triton asks the allocator set here for."""
    if not _ALLOCATOR_SET[0] and hasattr(triton, "set_allocator"):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8))
        _ALLOCATOR_SET[0] = True


def make_launch(variant: str, cfg: Cfg, x, w, y, desc: str | None, num_sms: int):
    """A callable that computes y = x wᵀ with one launch; descriptors and grid are built here, once, so that the
    timed calls pay only the launch."""
    M, K = x.shape
    N = w.shape[0]
    tiles = triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn)
    opts = dict(num_warps=cfg.warps, num_stages=cfg.stages)
    if variant == "plain":
        grid = (tiles,)
        return lambda: plain_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=cfg.bm,
                                          BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=cfg.group_m, **opts)
    if desc == "host":
        if TensorDescriptor is None:
            raise RuntimeError("triton.tools.tensor_descriptor.TensorDescriptor is not available")
        args = (TensorDescriptor.from_tensor(x, [cfg.bm, cfg.bk]), TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk]),
                TensorDescriptor.from_tensor(y, [cfg.bm, cfg.bn]))
    elif desc == "device":
        if not HAS_DEVICE_DESC:
            raise RuntimeError("tl.make_tensor_descriptor is not available")
        _ensure_allocator(x.device)
        args = (x, w, y)
    else:
        raise ValueError(f"descriptor mode {desc!r}")
    grid = (min(num_sms, tiles),)
    meta = dict(BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=cfg.group_m, NUM_SMS=num_sms,
                FLATTEN=cfg.flatten, DEVICE_DESC=desc == "device", **opts)
    if variant == "tma_persistent":
        return lambda: tma_persistent_kernel[grid](*args, M, N, K, **meta)
    return lambda: tma_persistent_ws_kernel[grid](*args, M, N, K, WS_TILE_LOOP=cfg.ws == "tile",
                                                  WS_K_LOOP=cfg.ws == "k", **meta)


def desc_modes(variant: str, desc: str):
    if variant not in TMA_VARIANTS:
        return [None]
    return ["host", "device"] if desc == "auto" else [desc]


def _line(s: str, n: int) -> str:
    """s on one line (whitespace runs collapsed), cut to n characters: for the printed report."""
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _err(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= 1500 else s[:1200] + " ... " + s[-280:]


# ---------------------------------------------------------------------------------------------------- checking
def make_inputs(M, N, K, dtype, device, seed=None):
    """x ~ N(0, 1), W ~ N(0, 1/K): y's elements are about N(0, 1). Never zeros (a kernel that skips work would
    pass on zeros)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else M * 131 + N * 7 + K)
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    w = (torch.randn(N, K, device=device, generator=g) * K ** -0.5).to(dtype)
    return x, w


class Problem:
    """Inputs, float64 reference and torch's same-dtype error, shared by every config checked on it."""

    def __init__(self, M, N, K, dtype, device):
        self.M, self.N, self.K, self.dtype, self.device = M, N, K, dtype, device
        self.x, self.w = make_inputs(M, N, K, dtype, device)
        self.ref = self.x.double() @ self.w.double().T
        same = F.linear(self.x, self.w)
        self.err_torch = self.rel_err(same)

    def rel_err(self, y) -> float:
        return ((y.double() - self.ref).norm() / self.ref.norm()).item()


def kernel_info(compiled, cfg: Cfg) -> dict:
    """What the compiler made of a config (from the CompiledKernel a launch returns; nothing under the
    interpreter): warps (more than asked for: warp-specialised), shared memory, registers and spills."""
    md = getattr(compiled, "metadata", None)
    if md is None:
        return {}
    info = dict(num_warps=getattr(md, "num_warps", None), shared=getattr(md, "shared", None))
    for name in ("n_regs", "n_spills"):
        try:
            info[name] = int(getattr(compiled, name))
        except Exception:  # not exposed by this triton, or not loaded
            pass
    if info["num_warps"] is not None:
        info["ws_active"] = info["num_warps"] > cfg.warps
    return info


def check_one(variant, cfg, prob: Problem, desc, num_sms) -> dict:
    """One launch on prob with y pre-filled with NaN; the error rule of bench/dev/gemm_sm90_probe.py's check."""
    y = torch.full((prob.M, prob.N), float("nan"), device=prob.device, dtype=prob.dtype)
    compiled = make_launch(variant, cfg, prob.x, prob.w, y, desc, num_sms)()
    if y.is_cuda:
        torch.cuda.synchronize()
    unwritten = int(torch.isnan(y).sum())
    err = prob.rel_err(y)
    ok = unwritten == 0 and err <= 2 * prob.err_torch + 1e-6  # False for a NaN err too
    return dict(err=err, err_torch=prob.err_torch, unwritten=unwritten, ok=bool(ok), kernel=kernel_info(compiled, cfg))


def run_checks(variants, dtypes, quick, desc, device, num_sms, problems, skip=(), progress=None, log=print):
    """Checks every (variant, config, dtype) on each of ``problems`` ((M, K, N) each). Returns one record per item:
    ok (all passed), the descriptor mode used, what the compiler made of it (kernel), errors. Progress lines (JSON)
    go to ``progress`` before and after each item, so that a parent process can tell which item a crash or hang
    interrupted."""
    records = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        inputs = {}  # one Problem per shape, shared by every config
        for variant in variants:
            for cfg in configs_for(variant, quick):
                key = f"{variant}/{cfg.name}/{dname}"
                if key in skip:
                    continue
                if progress:
                    progress.write(json.dumps({"event": "start", "key": key}) + "\n")
                    progress.flush()
                rec = dict(key=key, variant=variant, config=cfg.name, dtype=dname, desc=None, ok=False, errors=[],
                           checks=[], kernel={})
                broken = None
                for mode in desc_modes(variant, desc):
                    results, failed = [], None
                    for (M, K, N) in problems:
                        why = tma_unsupported(M, N, K, dtype) if variant in TMA_VARIANTS else None
                        if why:
                            results.append(dict(M=M, K=K, N=N, skipped=why))
                            continue
                        if (M, K, N) not in inputs:
                            inputs[(M, K, N)] = Problem(M, N, K, dtype, device)
                        try:
                            r = check_one(variant, cfg, inputs[(M, K, N)], mode, num_sms)
                        except Exception as e:  # a compile error, out of resources, an unsupported API
                            failed = _err(e)
                            broken = _cuda_broken(device)
                            break
                        kern = r.pop("kernel")
                        rec["kernel"] = rec["kernel"] or kern
                        results.append(dict(M=M, K=K, N=N, **r))
                    if failed is None:
                        rec.update(desc=mode, checks=results, ok=all(r.get("ok", True) for r in results))
                        break
                    rec["errors"].append(f"[desc={mode}] {failed}" if mode else failed)
                    if broken:
                        break
                if broken:
                    rec["ok"] = False
                    rec["errors"].append(f"the CUDA context is broken after this item: {broken}")
                records.append(rec)
                log(check_line(rec))
                if progress:
                    progress.write(json.dumps({"event": "done", "key": key, "record": rec}) + "\n")
                    progress.flush()
                    if broken:  # every later launch in this process would fail: the parent starts a fresh one
                        os._exit(RESTART_RC)
                elif broken:
                    raise RuntimeError(f"{key} broke the CUDA context ({broken}); run with isolation")
    return records


RESTART_RC = 75  # a check child's exit code after a kernel broke its CUDA context (its item already reported)


def _cuda_broken(device) -> str | None:
    """After a failed check: the error that the CUDA context now returns to everything (an illegal address, a
    launch failure), or None when it still works (a compile error, a resource limit)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()
        return None
    except Exception as e:
        return _err(e)


def check_line(rec) -> str:
    """One line for a check record: status, what the compiler made of the config, the errors."""
    status = "ok" if rec["ok"] else ("FAIL" if rec["checks"] else "ERROR")
    detail = " ".join(f"{r['M']}x{r['K']}->{r['N']}: " + (r["skipped"] if "skipped" in r else
                      f"err {r['err']:.2e} (torch {r['err_torch']:.2e}, unwritten {r['unwritten']})")
                      for r in rec["checks"])
    k = rec.get("kernel") or {}
    kinfo = (f" [warps {k.get('num_warps')}, shared {k.get('shared')}, regs {k.get('n_regs', '?')}, "
             f"spills {k.get('n_spills', '?')}{', WS' if k.get('ws_active') else ''}]") if k else ""
    return (f"check {rec['key']}{' desc=' + rec['desc'] if rec['desc'] else ''}: {status}{kinfo} {detail}"
            + (f" | {' | '.join(_line(e, 300) for e in rec['errors'])}" if rec["errors"] else ""))


def _read_progress(path):
    """(records finished, key of the item started and not finished or None) from a check child's progress file."""
    done, started = {}, None
    with open(path) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if ev["event"] == "start":
                started = ev["key"]
            else:
                done[ev["key"]] = ev["record"]
                started = None
    return done, started


def run_checks_isolated(args, variants, item_limit_s=90.0, log=print) -> list:
    """run_checks in child processes. A child that dies (a kernel that corrupted the CUDA context, a crash) or
    makes no progress for item_limit_s (a hang; the first item's limit also covers the child's start-up) gets the
    item it was on blamed; a fresh child then goes on after that item. Kernels compiled in a child are in triton's
    disk cache, so the parent's first calls load them without compiling."""
    records, dead = {}, []
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    fd, out_path = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    try:
        for _ in range(8):  # at most 7 blamed items
            open(path, "w").close()
            cmd = [sys.executable, os.path.abspath(__file__), "--check-only", "--progress", path,
                   "--variants", ",".join(variants), "--dtypes", args.dtypes, "--shapes", args.shapes,
                   "--desc", args.desc, "--check-M", str(args.check_M), "--odd", args.odd,
                   "--skip", ",".join(sorted(records))] + (["--quick"] if args.quick else [])
            with open(out_path, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                size, last, rc = -1, time.time(), None
                while rc is None:
                    time.sleep(0.25)
                    rc = proc.poll()
                    if os.path.getsize(path) != size:
                        size, last = os.path.getsize(path), time.time()
                    elif rc is None and time.time() - last > item_limit_s:
                        proc.kill()
                        proc.wait()
                        rc = "hang"
            done, started = _read_progress(path)
            for rec in done.values():
                log(check_line(rec))
            records.update(done)
            if rc == 0 and started is None:
                break
            if rc == RESTART_RC and started is None:  # the item that broke the context is reported: go on
                continue
            with open(out_path, errors="replace") as f:
                tail = f.read()[-600:]  # the child's own output: warnings, compiler messages, a traceback
            if started is None:  # died outside any item (import, CUDA init): nothing to blame, nothing to retry
                dead.append(f"check child rc={rc}: {tail}")
                log(f"check child failed outside an item (rc={rc}): {_line(tail, 600)}")
                break
            variant, cfg, dname = started.split("/")
            msg = (f"the check process hung on this item (killed after {item_limit_s:.0f}s without progress)"
                   if rc == "hang" else f"the check process died on this item (rc={rc})")
            msg += f": {tail.strip()}" if tail.strip() else ""
            records[started] = dict(key=started, variant=variant, config=cfg, dtype=dname, desc=None, ok=False,
                                    errors=[msg], checks=[])
            log(f"check {started}: ERROR {_line(msg, 600)}")
    finally:
        os.unlink(path)
        os.unlink(out_path)
    for dname in args.dtypes.split(","):  # items no child reached (a failure before them, or too many restarts)
        for variant in variants:
            for cfg in configs_for(variant, args.quick):
                key = f"{variant}/{cfg.name}/{dname}"
                if key not in records:
                    records[key] = dict(key=key, variant=variant, config=cfg.name, dtype=dname, desc=None, ok=False,
                                        errors=["not checked: " + (dead[0][:300] if dead else "too many restarts")],
                                        checks=[])
    return list(records.values())


# ------------------------------------------------------------------------------------------------------ timing
def _wall_est_ms(fns, n=5) -> float:
    """Wall time per call of back-to-back calls (bench_ms's estimate): what _gpu_time sizes its sleep from."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(n):
        fns[i % len(fns)]()
    e.record()
    torch.cuda.synchronize()
    return max(s.elapsed_time(e) / n, 1e-4)


def burst_interleaved(cands: dict, rounds: int) -> dict:
    """Median GPU time (us) of one call of each candidate (a list of callables, one per input set): every round
    times each candidate once with timing._gpu_time (one batch of calls behind a GPU sleep, events around the batch),
    the candidates' order rotating from round to round."""
    est = {k: _wall_est_ms(f) for k, f in cands.items()}
    keys = list(cands)
    samples = {k: [] for k in keys}
    hidden = {k: 0.0 for k in keys}
    calls = {}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            g = timing._gpu_time(cands[k], est[k], reps=1)
            samples[k].append(g["gpu_ms"])
            hidden[k] += g["gpu_hidden_frac"]
            calls[k] = g["gpu_calls_per_rep"]
    return {k: dict(us=statistics.median(samples[k]) * 1e3, hidden_frac=hidden[k] / rounds, calls=calls[k],
                    rounds=rounds) for k in keys}


def bench_cell(K, N, M, dname, passing, num_sms, reps, device="cuda") -> tuple[list, list]:
    """cuBLAS and every passing (variant, config) on one (shape, M, dtype): the screen, then the best per variant
    again with cuBLAS. Returns (rows, errors)."""
    dtype = DTYPES[dname]
    per_set = (M * K + N * K + M * N) * torch.empty((), dtype=dtype).element_size()
    sets = []
    for i in range(timing.n_rotation_sets(per_set)):
        x, w = make_inputs(M, N, K, dtype, device, seed=1000 + i)
        sets.append((x, w, torch.empty(M, N, device=device, dtype=dtype)))
    cublas = [lambda x=x, w=w: F.linear(x, w) for x, w, _ in sets]
    cands, errors = {}, []
    kernels = {}
    for (variant, cfg, desc, kern) in passing:
        if desc is not None and tma_unsupported(M, N, K, dtype):
            errors.append(dict(variant=variant, config=cfg.name, dtype=dname, stage="time", shape=[M, K, N],
                               error=tma_unsupported(M, N, K, dtype)))
            continue
        try:
            fns = [make_launch(variant, cfg, x, w, y, desc, num_sms) for x, w, y in sets]
            fns[0]()
            if sets[0][2].is_cuda:
                torch.cuda.synchronize()
        except Exception as e:
            errors.append(dict(variant=variant, config=cfg.name, dtype=dname, stage="time", shape=[M, K, N],
                               error=_err(e)))
            continue
        cands[(variant, cfg.name, desc)] = fns
        kernels[(variant, cfg.name, desc)] = kern
    screen = burst_interleaved({"cublas": cublas, **cands}, max(3, reps // 4)) if cands else {}
    best = {}
    for key in cands:
        if key[0] not in best or screen[key]["us"] < screen[best[key[0]]]["us"]:
            best[key[0]] = key
    final = burst_interleaved({"cublas": cublas, **{k: cands[k] for k in best.values()}}, reps) if best else {}
    rows = []
    flops = 2.0 * M * N * K
    for variant, key in best.items():
        t, tc = final[key], final["cublas"]
        rows.append(dict(K=K, N=N, M=M, dtype=dname, variant=variant, config=key[1], desc=key[2], us=t["us"],
                         cublas_us=tc["us"], ratio=tc["us"] / t["us"], tflops=flops / t["us"] / 1e6,
                         cublas_tflops=flops / tc["us"] / 1e6, kernel=kernels[key], hidden_frac=t["hidden_frac"],
                         cublas_hidden_frac=tc["hidden_frac"], calls_per_batch=t["calls"], sets=len(sets),
                         screen={f"{k[1]}": round(screen[k]["us"], 2) for k in cands if k[0] == variant},
                         screen_cublas_us=screen["cublas"]["us"]))
    return rows, errors


# ------------------------------------------------------------------------------------------------------ report
def summarize(rows, variants, n_cells) -> dict:
    """Per variant: geomean of the ratio over its cells, the worst cell, how many cells it has (a variant reaches the
    bar only with every cell measured), and in how many the best config was warp-specialised."""
    out = {}
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            out[v] = dict(cells=0, of=n_cells, geomean=None, worst=None, reaches=False, ws_cells=0)
            continue
        gm = math.exp(sum(math.log(r["ratio"]) for r in rs) / len(rs))
        w = min(rs, key=lambda r: r["ratio"])
        out[v] = dict(cells=len(rs), of=n_cells, geomean=gm, reaches=bool(gm >= TARGET and len(rs) == n_cells),
                      worst=dict(ratio=w["ratio"], K=w["K"], N=w["N"], M=w["M"], dtype=w["dtype"],
                                 config=w["config"]),
                      ws_cells=sum(bool((r.get("kernel") or {}).get("ws_active")) for r in rs))
    return out


def _not_hidden(r) -> bool:
    return min(r["hidden_frac"], r["cublas_hidden_frac"]) < 0.5


def format_report(rows, summary, failed) -> str:
    """The markdown table, per-variant geomean and worst cell, what failed, and one verdict line per variant."""
    lines = ["| K->N | M | dtype | variant | best config | desc | us ours | us cuBLAS | ratio | TFLOP/s ours | "
             "TFLOP/s cuBLAS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ws = " (WS)" if (r.get("kernel") or {}).get("ws_active") else ""
        lines.append(f"| {r['K']}->{r['N']} | {r['M']} | {r['dtype']} | {r['variant']} | {r['config']}{ws} | "
                     f"{r['desc'] or '-'} | {r['us']:.1f} | {r['cublas_us']:.1f} | {r['ratio']:.3f}"
                     f"{' (!)' if _not_hidden(r) else ''} | {r['tflops']:.0f} | {r['cublas_tflops']:.0f} |")
    if any(_not_hidden(r) for r in rows):
        lines.append("(!) the host's enqueue outlasted the GPU sleep in most rounds: that time is not GPU-only")
    lines.append("")
    for v, s in summary.items():
        if not s["cells"]:
            lines.append(f"{v}: no cells measured")
            continue
        w = s["worst"]
        ws = f"; best config warp-specialised in {s['ws_cells']}/{s['cells']} cells" if v.endswith("_ws") else ""
        lines.append(f"{v}: geomean cuBLAS/ours {s['geomean']:.3f}x over {s['cells']}/{s['of']} cells, worst "
                     f"{w['ratio']:.3f}x ({w['K']}->{w['N']} M={w['M']} {w['dtype']} {w['config']}){ws}")
    if any(failed.values()):
        lines.append("")
        lines.append("configs that did not compile, run or pass (details in the JSON's errors):")
        for v, errs in failed.items():
            for e in errs[:6]:
                lines.append(f"  {v} {_line(e, 240)}")
            if len(errs) > 6:
                lines.append(f"  {v}: {len(errs) - 6} more")
    lines.append("")
    for v, s in summary.items():
        if not s["cells"]:
            verdict = "could not be measured (no config compiled, ran and passed the check)"
        elif s["reaches"]:
            verdict = f"REACHES >= {TARGET}x cuBLAS (geomean {s['geomean']:.3f}x)"
        elif s["geomean"] >= TARGET:
            verdict = (f"geomean {s['geomean']:.3f}x >= {TARGET}x but only {s['cells']}/{s['of']} cells measured: "
                       "not established")
        else:
            verdict = f"does NOT reach {TARGET}x cuBLAS (geomean {s['geomean']:.3f}x)"
        lines.append(f"verdict {v}: {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- smoke
SMOKE_SHAPES = [(64, 128, 96), (50, 80, 72)]  # (M, K, N): whole tiles; partial tiles in M, N and K
SMOKE_CFG = Cfg(32, 32, 32, stages=2, warps=4, group_m=2)


def smoke(log=print) -> list:
    """Every variant (each descriptor mode, each warp-specialisation placement) once per SMOKE_SHAPES problem,
    fp16 on the CPU through the interpreter (TRITON_INTERPRET=1, set before triton is imported), against float64
    with the same rule as on the GPU. A TMA variant whose descriptors the interpreter cannot run is "skipped"; any
    other exception is an "error", a wrong result a "fail". NUM_SMS = 2 so the persistent loop walks several
    tiles per program."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("smoke mode runs on the CPU interpreter: TRITON_INTERPRET=1 and no CUDA device")
    cfgs = {"plain": [SMOKE_CFG], "tma_persistent": [_with(SMOKE_CFG, flatten=True)],
            "tma_persistent_ws": [_with(SMOKE_CFG, ws="k"), _with(SMOKE_CFG, ws="tile")]}
    out = []
    for (M, K, N) in SMOKE_SHAPES:
        prob = Problem(M, N, K, torch.float16, torch.device("cpu"))
        for variant in VARIANTS:
            for cfg in cfgs[variant]:
                for mode in desc_modes(variant, "auto"):
                    rec = dict(variant=variant, config=cfg.name, desc=mode, M=M, K=K, N=N)
                    try:
                        r = check_one(variant, cfg, prob, mode, num_sms=2)
                        rec.update(r, status="ok" if r["ok"] else "fail")
                    except Exception as e:
                        rec.update(status="skipped" if variant in TMA_VARIANTS else "error", reason=_err(e))
                    out.append(rec)
                    log(f"smoke {variant} {cfg.name} desc={mode} {M}x{K}->{N}: {rec['status']} "
                        + (f"err {rec['err']:.2e} (torch {rec['err_torch']:.2e}, unwritten {rec['unwritten']})"
                           if "err" in rec else rec.get("reason", "")[:300]))
    return out


# -------------------------------------------------------------------------------------------------------- main
def parse_shapes(s):
    return [tuple(int(v) for v in item.lower().split("x")) for item in s.split(",") if item]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--M", default="2048,8192")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,... (y = x Wᵀ, K -> N)")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=20, help="final burst rounds per cell (the screen runs reps/4)")
    ap.add_argument("--quick", action="store_true", help="2 configs per variant")
    ap.add_argument("--desc", default="auto", choices=("auto", "host", "device"),
                    help="TMA descriptors: host-side TensorDescriptor, device-side tl.make_tensor_descriptor, or "
                         "host with device as the fallback")
    ap.add_argument("--check-M", type=int, default=CHECK_M, help="M of the check on the first shape")
    ap.add_argument("--odd", default=ODD_SHAPE, help="MxKxN of the odd-shape check ('' for none)")
    ap.add_argument("--no-isolate", action="store_true", help="run the correctness checks in this process")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter run of each variant on a tiny problem")
    ap.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)  # the isolated check child
    ap.add_argument("--progress", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    t0 = time.time()

    if args.smoke:
        res = smoke()
        bad = [r for r in res if r["status"] in ("fail", "error")]
        print(f"smoke: {sum(r['status'] == 'ok' for r in res)} ok, "
              f"{sum(r['status'] == 'skipped' for r in res)} skipped, {len(bad)} failed")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"smoke": res, "triton": triton.__version__, "torch": torch.__version__}, f, indent=1)
        return 1 if bad else 0

    shapes = parse_shapes(args.shapes)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANT_CONFIGS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {VARIANTS}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    problems = [(args.check_M, *shapes[0])] + parse_shapes(args.odd)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.check_only and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("no CUDA device: run --smoke under TRITON_INTERPRET=1 for the CPU check")
    device = torch.device("cuda" if cuda else "cpu")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 2

    if args.check_only:
        with open(args.progress, "a") as prog:
            run_checks(variants, dtypes, args.quick, args.desc, device, num_sms, problems,
                       skip=set(filter(None, args.skip.split(","))), progress=prog, log=lambda s: None)
        return 0

    dev = torch.cuda.get_device_name()
    print(f"device {dev} ({num_sms} SMs) torch {torch.__version__} cuda {torch.version.cuda} "
          f"triton {triton.__version__}", flush=True)
    log = lambda s: print(s, flush=True)
    if args.no_isolate:
        checks = run_checks(variants, dtypes, args.quick, args.desc, device, num_sms, problems, log=log)
    else:
        checks = run_checks_isolated(args, variants, log=log)
    print(f"checks: {sum(c['ok'] for c in checks)} passed of {len(checks)} ({time.time() - t0:.0f}s)", flush=True)

    # a config that passed with device-side descriptors after the host-side ones failed keeps that error as a note
    errors = [dict(variant=c["variant"], config=c["config"], dtype=c["dtype"], stage="check", error=e,
                   fatal=not c["ok"]) for c in checks for e in c["errors"]]
    errors += [dict(variant=c["variant"], config=c["config"], dtype=c["dtype"], stage="check", fatal=True,
                    error="wrong result: " + json.dumps(c["checks"]))
               for c in checks if c["checks"] and not c["ok"]]
    cfg_by_name = {(v, c.name): c for v in variants for c in configs_for(v, args.quick)}
    Ms = [int(m) for m in args.M.split(",") if m]
    n_cells = len(dtypes) * len(shapes) * len(Ms)
    rows = []

    def save(final=False):  # after every cell, so that a run cut short still leaves what it measured
        if not args.out:
            return
        summary = summarize(rows, variants, n_cells)
        with open(args.out, "w") as f:
            json.dump(dict(device=dev, num_sms=num_sms, torch=torch.__version__, cuda=torch.version.cuda,
                           triton=triton.__version__, python=sys.version.split()[0], args=vars(args),
                           complete=final, checks=checks, errors=errors, rows=rows, summary=summary,
                           variants_without_cells=[v for v, s in summary.items() if not s["cells"]],
                           elapsed_s=time.time() - t0), f, indent=1)

    save()
    for dname in dtypes:
        passing = [(c["variant"], cfg_by_name[(c["variant"], c["config"])], c["desc"], c.get("kernel") or {})
                   for c in checks if c["ok"] and c["dtype"] == dname]
        for M in Ms:
            for (K, N) in shapes:
                r, e = bench_cell(K, N, M, dname, passing, num_sms, args.reps)
                rows += r
                errors += [dict(err, fatal=True) for err in e]
                for row in r:
                    log(f"M={M} {K}->{N} {dname} {row['variant']:<18} {row['config']:<24} {row['us']:8.1f} us "
                        f"cuBLAS {row['cublas_us']:8.1f} us ratio {row['ratio']:.3f} ({row['tflops']:.0f} TF)")
                for err in e:
                    log(f"M={M} {K}->{N} {dname} {err['variant']} {err['config']}: not timed: "
                        f"{_line(err['error'], 300)}")
                torch.cuda.empty_cache()
                save()
    summary = summarize(rows, variants, n_cells)
    failed, fallbacks = {}, {}
    for e in errors:
        (failed if e.get("fatal", True) else fallbacks).setdefault(e["variant"], []).append(
            f"{e['config']}/{e['dtype']}: {e['error']}")
    print()
    for v, notes in fallbacks.items():
        print(f"note: {v}: {len(notes)} config(s) ran with device-side descriptors after the host-side ones failed "
              f"({_line(notes[0], 200)})")
    print(format_report(rows, summary, failed))
    print(f"\ntotal {time.time() - t0:.0f}s", flush=True)
    save(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
