"""Every environment variable that lora_kernels reads: what it does and when it is read.

Read on every call. Changing one between two calls changes the second call.

    LORA_KERNELS_BACKEND                the backend of calls with backend=None or 'auto': auto (default), torch,
                                        triton or cuda. A backend named in the call wins. Under torch.compile it is
                                        read when the graph is traced.
    LORA_KERNELS_TRITON_MAINLOOP        triton backend: who runs the frozen GEMM of the output passes (the
                                        forward's y, the backward's dx). auto (default): as tma where the rank
                                        pads to at most 16 (configs._TMA_AUTO_MAX_R_PAD), except dx with dropout,
                                        else as cublas (what measured faster on the H200); under the interpreter
                                        as triton. cublas: cuBLAS accumulates into the output that the LoRA kernel
                                        wrote. triton: the LoRA kernel runs the main loop as well, with pointer
                                        loads (always so under the interpreter). tma: one persistent Triton kernel
                                        computes the whole output, its main loop through TMA tensor descriptors;
                                        calls it cannot take (no Hopper GPU, fp32 x, M <= 64, r > 64, rows not
                                        16-byte aligned, no descriptor API) run as with cublas (under the
                                        interpreter: as with triton). The interpreter runs it too.
    LORA_KERNELS_TRITON_FP32_PRECISION  triton backend: ieee (default) or tf32, the dots of fp32 inputs.
    LORA_KERNELS_TRITON_AUTOTUNE        triton backend: 1 (default) tunes each new problem once; 0 launches fixed
                                        configs with no tuning runs (the GPU tests set 0).

Read once, when lora_kernels is imported:

    TRITON_INTERPRET                    Triton's own switch. With 1, Triton's interpreter runs the kernels on CPU
                                        tensors, which is how the tests run without a GPU. Triton reads it when
                                        the kernels are defined, so a later change has no effect.
    LORA_KERNELS_TRITON_FAST_LAUNCH     triton backend: 1 (default) relaunches compiled kernels without triton's
                                        JITFunction.run (host time); 0 launches every kernel through the JIT.
    LORA_KERNELS_CPP_AUTOGRAD           cuda backend: 1 (default) runs eager calls in C++ from the op call on (the
                                        entry of csrc/lora_autograd.h: checks, seed, reshapes and, for calls that
                                        need grads with a frozen weight and bias, its C++ autograd node); 0 uses the
                                        Python wrapper and autograd of lora_kernels.ops instead (which a trainable
                                        weight or bias always uses). The same for dora_linear, with and without
                                        dropout (the entry of csrc/dora_autograd.h; 0: the Python path of
                                        lora_kernels.dora).
    LORA_KERNELS_TRITON_FP32_SPLIT      triton backend: 1 (default) runs the adapter products of fp32 adapters on a
                                        bf16 x (u, g, dA, dB) on tensor cores, the fp32 operand split into three
                                        bf16 pieces (as the cuda backend); 0 runs them as fp32 "ieee" dots (about 3x
                                        slower fwd+bwd at training shapes, same precision class).
    LORA_KERNELS_DORA_SAVE_Y            dora_linear: 1 (default) keeps the output y for the backward at p = 0 on the
                                        fast backends (z = (y - b) / g, no recompute GEMM; y is the tensor the call
                                        returns, not a copy); 0 recomputes z in row chunks there too.
    LORA_KERNELS_DORA_SAVE_Z            dora_linear: 1 saves z = x_d (W + s B A)^T (M x N) for the backward (faster,
                                        more memory; any p); 0 (default) recomputes it in row chunks where y is not
                                        kept.
    LORA_KERNELS_DORA_CHUNK_MIB         dora_linear: the row chunks' temporary budget in MiB (default 64).

Read by the CUDA extension (csrc/binding.cpp), once, when a GEMM first asks for it:

    LORA_KERNELS_SM90_GEMM              0 turns off the sm_90 GEMM with the rank-r term in its K axis (cuBLAS runs
                                        instead).
    LORA_KERNELS_SM90_GEMM_CONFIG       forces the sm_90 GEMM's tile (csrc/gemm_sm90.cu), and the fused forward's
                                        lead tiles' without dropout: 1 128 x 128 ping-pong, 4 128 x 256
                                        cooperative; unset: chosen per problem. A/B timing.
    LORA_KERNELS_SM90_GEMM_SWIZZLE      forces the sm_90 GEMM's tile-order swizzle (1, 2 or 4); unset: 4 unless a
                                        smaller one runs fewer waves of tiles (csrc/gemm_sm90.cu). A/B timing.
    LORA_KERNELS_SM90_GEMM_TRIM         0 makes the sm_90 GEMM multiply the whole rank-r extension K-tile, r's zero
                                        padding up to 64 included; unset: only the 16-deep steps that r reaches
                                        (csrc/gemm_sm90.cuh). A/B timing.
    LORA_KERNELS_SM90_DX_MASK           0 keeps dx with dropout off the sm_90 GEMM (the dx kernel writes the masked
                                        term, cuBLAS adds dy W): for A/B timing.
    LORA_KERNELS_SM90_DY                0 keeps the backward's dy pass on its mma.sync kernel (csrc/dy_pass.cu)
                                        instead of the wgmma one on Hopper (csrc/dy_pass_sm90.cu): for A/B timing.
    LORA_KERNELS_SM90_DA                0 keeps the backward's dA pass on its mma.sync kernel (csrc/dA.cu) instead of
                                        the wgmma one on Hopper (csrc/dA_sm90.cu): for A/B timing.
    LORA_KERNELS_DA_BESIDE              dA beside the dx GEMM on Hopper (csrc/dA_sm90.cu: the GEMM's grid leaves some
                                        SMs free and dA streams x there meanwhile): unset, where a cost model of both
                                        finds it faster; 0 never; n > 0 on n SMs wherever both run on sm_90. It starts
                                        the setting that cuda_backend.set_dA_beside changes at run time.
    LORA_KERNELS_DA_IN_GEMM             1 takes dA inside the dx GEMM on Hopper (csrc/gemm_sm90.h, da_x: x read by
                                        the GEMM, row-block partials summed by a reduce, no dA pass) wherever it can
                                        run (adapters in x's dtype, r <= 64); unset or 0: the dA pass (it measured
                                        slower, session 60). It starts the setting that cuda_backend.set_dA_in_gemm
                                        changes at run time.
    LORA_KERNELS_DA_GEMM                the backward's dA at p = 0 as a GEMM on Hopper (csrc/dA_gemm_sm90.cu: (s·g)ᵀ x
                                        after the dx GEMM, r a multiple of 8): unset or 1, wherever s·g's columns (r,
                                        or 3r for fp32 adapters' pieces) number at most 192; 0 never (the dA pass).
                                        It starts the setting that cuda_backend.set_dA_gemm changes at run time.
    LORA_KERNELS_DA_GEMM_PROMOTE        n: the dA GEMM adds its tensor cores' sum into its fp32 accumulator every n
                                        64-token K-tiles (default 1, as the dA pass adds its tile products; 0 only
                                        at a token range's end, which lost accuracy over long ranges, session 62;
                                        every K-tile cost nothing measurable, session 63). Read once per process:
                                        for A/B timing.
    LORA_KERNELS_DA_GEMM_WAVES          n (1 to 16, default 1): the dA GEMM's token ranges make n waves of tiles (n
                                        times as many, shorter ranges) instead of one (2 and 4 gained nothing,
                                        session 63). Read once: for A/B timing.
    LORA_KERNELS_DA_MASKED              0 takes dA with dropout off the wgmma kernel's own masking (csrc/dA_sm90.cu)
                                        and onto its mma.sync kernel (csrc/dA.cu): for A/B timing.
    LORA_KERNELS_SM90_SHRINK            0 keeps the forward's shrink on its mma.sync kernel (csrc/shrink.cu) instead of
                                        the wgmma one on Hopper (csrc/shrink_sm90.cu); 2 takes the wgmma one with
                                        dropout at r <= 16 too: for A/B timing.
    LORA_KERNELS_SHRINK_DROP            the forward's shrink with dropout that makes its mask itself in one pass over
                                        x (csrc/shrink_drop.cu): unset, where it measured faster (compute capability
                                        9.0, r <= 32 with 16-bit adapters, r <= 16 with fp32 ones); 0 never (the
                                        keep-bits pass and the shrink that reads them); 1 wherever it runs. It starts
                                        the setting that cuda_backend.set_shrink_drop changes at run time.
    LORA_KERNELS_SHRINK_DROP_ROWS       16 or 32: that kernel's row block at r <= 32 (one or two 16-row tiles per
                                        block), for A/B timing; unset, 32 up to r = 16 and 16 above.
    LORA_KERNELS_SHRINK_DROP_WAVES      1 to 4: the waves of resident blocks that kernel's K split aims at (default
                                        2), for A/B timing.
    LORA_KERNELS_SHRINK_DROP_RING       how that kernel loads x: 0 plain loads (one 32-column step in flight per
                                        warp), 2 or 4 a cp.async ring of that many steps per warp; unset, a ring of
                                        2 above r = 16 with 16-bit adapters and plain loads elsewhere (measured). It
                                        starts the setting that cuda_backend.set_shrink_drop_ring changes.
    LORA_KERNELS_SMALL_M                0 turns off the one-launch forward at M <= 64 (csrc/small_m.cu); it starts
                                        the switch that cuda_backend.set_small_m changes at run time.
    LORA_KERNELS_SMALL_M_SM90           0 turns off that forward's Hopper kernel (csrc/small_m_sm90.cu: wgmma,
                                        p = 0, adapters in x's dtype); it starts the switch that
                                        cuda_backend.set_small_m_sm90 changes.
    LORA_KERNELS_SMALL_M_SM90_FP32      1 lets that kernel and the backward's below take fp32 adapters on bf16 x at
                                        r <= 16 (their bf16x3 pieces). Correct (float64 tests), but slower than the
                                        mma.sync kernel and the passes (session 57), so off by default.
    LORA_KERNELS_SMALL_M_SM90_CLUSTER   1, 2, 4 or 8: that kernel's K split (cluster size), forced, for A/B timing;
    LORA_KERNELS_SMALL_M_SM90_BN        64 or 128: its CTA's rows of W, forced, for A/B timing. Unset, the pair that
                                        puts the most CTAs in one wave (the GPU's cluster occupancy).
    LORA_KERNELS_SMALL_M_SM90_DX        0 turns off the small-M backward's Hopper path (M <= 64, p = 0, the same
                                        adapters: dx by that kernel transposed, then dA and dB in one launch,
                                        csrc/small_m_grads.cu); it starts the switch that
                                        cuda_backend.set_small_m_sm90_dx changes. The forced plans above apply to
                                        it too.
    LORA_KERNELS_SMALL_M_BWD_ROWS       the backward's small-M threshold (default 64, csrc/lora_kernels.cuh): at
                                        M up to it the dy pass and dA take their mma.sync kernels and dx cuBLAS;
                                        0 puts every M on the sm_90 kernels: for A/B timing.
    LORA_KERNELS_FUSED_FWD              the fused sm_90 forward (the shrink inside the GEMM, csrc/fused_fwd_sm90.h):
                                        unset, on at p = 0 and r <= 64, u computed by each row block's lead tiles
                                        (u tiles where they do not fit the output's tile columns); 1 u tiles only,
                                        dropout included (they mask their copy of x); 2 lead tiles only; 0 off. It
                                        starts the mode that cuda_backend.set_fused_forward changes at run time.
    LORA_KERNELS_FUSED_SPLIT            the fused forward's split variant (clusters of two 128 x 256 tiles sharing
                                        u's K-tiles, no lead tiles): unset, where the wide lead tiles would read
                                        16-bit adapters as they are at p = 0 and N <= 1024; 0 never; 1
                                        wherever it can run. It starts the mode that cuda_backend.set_fused_split
                                        changes.
    LORA_KERNELS_PDL                    0 launches the sm_90 kernels that follow a small launch of their own (the
                                        fused forward, the K-extended GEMM, the wgmma streaming passes) without
                                        programmatic dependent launch (csrc/pdl.cuh): for A/B timing.
    LORA_KERNELS_PLAN_MEMO              0 makes the streaming passes' split plans (csrc/stream_sm90.cuh) search on
                                        every call instead of remembering their last results per thread: for A/B
                                        timing of the host time.
    LORA_KERNELS_FUSED_DEBUG            development only (csrc/fused_fwd_sm90.h, FusedParams::debug): bits that make
                                        the fused forward skip its waits or its u products (wrong results, for
                                        timing), write a per-tile trace in u's place (bench/dev/fused_ab.py),
                                        keep the prep launch where the adapters need none, or turn off the tile
                                        order's K and row serpentines (A/B timing).
    LORA_KERNELS_FUSED_STRIP            development only: the fused forward's tile order, output cluster columns per
                                        strip (default 4).
    LORA_KERNELS_FUSED_AHEAD            development only: the fused forward's tile order, row blocks by which the
                                        lead tiles run ahead of the other tiles (0: all lead tiles first).

Read when the package is built (setup.py and build_backend/):

    LORA_KERNELS_SKIP_CUDA_BUILD        1 builds the pure-Python package, without the CUDA extension.
    LORA_KERNELS_CUDA_ARCHS             the compute capabilities to build for (default "80;90"; 90 as sm_90a).
    LORA_KERNELS_CUTLASS_DIR            a CUTLASS tree for the sm_90 GEMM, instead of the pinned nvidia-cutlass
                                        wheel.
    MAX_JOBS                            parallel compile jobs (torch's cpp_extension reads it).

(LORA_KERNELS_TORCH_FROM passes a message from the build backend to setup.py; it is not a setting.)

The scripts under bench/, tests/ and .ci/ take their own settings, each documented where it is read. Among them:
LORA_KERNELS_BENCH_CPU_SMOKE=1 (bench/suite/test_bench_lora.py: the tiny grid on the CPU), LORAFUSION_DIR
(bench/suite/peer_lorafusion.py: a LoRAFusion checkout), LORA_KERNELS_TRITON_ALT_PYTHON (tests/test_triton_*.py: a
second interpreter, with another triton version, for the checks that compile kernels),
LORA_KERNELS_NEWEST_TORCH_INCLUDE (tests/test_binding_host.py), LORA_KERNELS_TEST_WORKERS (tests/run.sh: pytest-xdist
workers, default one per core) and LORA_KERNELS_CACHE (.ci/newest_torch_headers.sh); the shell runners
(bench/gpu_check.sh, bench/train/two_gpu.sh, bench/tools/*.sh) list theirs at the top.

The per-call settings are read through ``_per_call``. os.environ.get encodes the name and decodes the value on every
call, about 1 us each, and an op call needs several. ``_per_call`` looks the encoded names up in the table that
CPython's os.environ keeps of the raw values, and parses the values once per distinct set of raw values.
"""
from __future__ import annotations

import os
from typing import NamedTuple

BACKEND = "LORA_KERNELS_BACKEND"

# ------------------------------------------------------------------------------------------ read at import
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_FAST_LAUNCH = os.environ.get("LORA_KERNELS_TRITON_FAST_LAUNCH", "1") != "0"
TRITON_FP32_SPLIT = os.environ.get("LORA_KERNELS_TRITON_FP32_SPLIT", "1") != "0"
CPP_AUTOGRAD = os.environ.get("LORA_KERNELS_CPP_AUTOGRAD", "1") != "0"
DORA_SAVE_Z = os.environ.get("LORA_KERNELS_DORA_SAVE_Z", "0") == "1"
DORA_SAVE_Y = os.environ.get("LORA_KERNELS_DORA_SAVE_Y", "1") != "0"
DORA_CHUNK_BYTES = int(float(os.environ.get("LORA_KERNELS_DORA_CHUNK_MIB", "64")) * 2**20)

# ------------------------------------------------------------------------------------------ read per call
_ENVIRON = os.environ
_RAW_ENV = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None) if isinstance(_RAW_ENV, dict) else None
_UNSET = object()


def _raw_getter(keys: tuple):
    """A function that returns the raw values of the encoded names ``keys`` (None for an unset one): one value, or
    a tuple of them. Spelled out for up to three names: a tuple display is several times faster than tuple(map())."""
    get = _RAW_ENV.get
    if len(keys) == 1:
        (a,) = keys
        return lambda: get(a)
    if len(keys) == 2:
        a, b = keys
        return lambda: (get(a), get(b))
    if len(keys) == 3:
        a, b, c = keys
        return lambda: (get(a), get(b), get(c))
    return lambda: tuple(map(get, keys))


def _per_call(names: tuple, parse):
    """A function that returns ``parse()`` for the current values of the variables ``names``, parsed once per
    distinct set of their raw values. ``parse`` reads them with os.environ and raises on an invalid value (then
    nothing is kept, and the next call raises again)."""
    parsed: dict = {}
    fast = _raw_getter(tuple(map(_ENCODE, names))) if _ENCODE is not None else None

    def read(_fast=fast, _get=parsed.get, _unset=_UNSET):
        if _fast is not None and os.environ is _ENVIRON:
            raw = _fast()
        else:  # no raw table (another Python), or os.environ was replaced
            raw = tuple(map(os.environ.get, names))
        value = _get(raw, _unset)
        if value is _unset:
            value = parsed[raw] = parse()
        return value

    return read


def _parse_backend():
    return os.environ.get(BACKEND) or None


backend = _per_call((BACKEND,), _parse_backend)
backend.__doc__ = "LORA_KERNELS_BACKEND as set now, or None where it is unset or empty (then: auto)."


class TritonKnobs(NamedTuple):
    """The triton backend's settings for one call."""
    interpret: bool  # TRITON_INTERPRET=1 (read at import): kernels run on CPU tensors under the interpreter
    autotune: bool  # LORA_KERNELS_TRITON_AUTOTUNE != 0
    cublas: bool  # LORA_KERNELS_TRITON_MAINLOOP is cublas, tma or auto (and the interpreter is off): cuBLAS runs
    #               the main loop of the output passes that the TMA kernel does not take
    fp32_prec: str  # LORA_KERNELS_TRITON_FP32_PRECISION: ieee or tf32
    tma: bool = False  # tma, or auto off the interpreter: the output passes try the TMA persistent kernel
    tma_auto: bool = False  # auto: the TMA kernel only where the rank pads to at most configs._TMA_AUTO_MAX_R_PAD


_TRITON_VARS = ("LORA_KERNELS_TRITON_MAINLOOP", "LORA_KERNELS_TRITON_FP32_PRECISION", "LORA_KERNELS_TRITON_AUTOTUNE")


def _parse_triton() -> TritonKnobs:
    env = os.environ
    mode = env.get("LORA_KERNELS_TRITON_MAINLOOP", "auto") or "auto"
    if mode not in ("auto", "cublas", "triton", "tma"):
        raise ValueError(f"LORA_KERNELS_TRITON_MAINLOOP must be auto, cublas, triton or tma, got {mode!r}")
    prec = env.get("LORA_KERNELS_TRITON_FP32_PRECISION", "ieee").lower()
    if prec not in ("tf32", "ieee"):
        raise ValueError(f"LORA_KERNELS_TRITON_FP32_PRECISION must be tf32 or ieee, got {prec!r}")
    auto = mode == "auto" and not TRITON_INTERPRET
    return TritonKnobs(TRITON_INTERPRET, env.get("LORA_KERNELS_TRITON_AUTOTUNE", "1") != "0",
                       mode in ("cublas", "tma", "auto") and not TRITON_INTERPRET, prec, mode == "tma" or auto, auto)


triton_knobs = _per_call(_TRITON_VARS, _parse_triton)
triton_knobs.__doc__ = "The triton backend's settings as set now (a TritonKnobs)."
