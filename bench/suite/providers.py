"""Providers for one LoRA linear layer  y = x Wᵀ (+ b) + s · (dropout(x) Aᵀ) Bᵀ.

``make_case(provider, M, K, N, r, p, ...)`` builds the inputs (torch.randn, never zeros) and returns a
``Case`` whose ``fwd`` / ``fwd_bwd`` are lists of callables, one per input set (for L2 rotation, see
``timing.n_rotation_sets``); ``case.fwd[0]()`` runs the first set.

Providers
  ours-<backend>   lora_kernels.lora_linear(..., backend=<backend>) for torch / triton / cuda;
                   adapters in ``adapter_dtype`` (default fp32, which is what PEFT's default config and thus
                   patch_peft hand the op).
  peft-layer       a real peft ``lora.Linear`` around an ``nn.Linear`` (get_peft_model on a one-Linear module,
                   default LoraConfig -> fp32 adapters via autocast_adapter_dtype, lora_dropout=p).
  formula-bf16     eager  F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B), everything bf16
                   (dropout skipped at p == 0, as PEFT does with nn.Identity).
  compile-formula  torch.compile(formula-bf16, mode=compile_mode (default "max-autotune-no-cudagraphs"),
                   dynamic=False: compiled per shape); with compile_dynamic, one dynamic=True graph for all shapes.
  addmm            out = F.linear(x, W, b); out.addmm_(x @ Aᵀ, Bᵀ, alpha=s)   -- NO dropout (p is ignored).
  cublas-base      the floor: fwd = F.linear(x, W); fwd_bwd = F.linear(x, W) then dy @ W (base dx GEMM).
  linear-autograd  the frozen linear a LoRA layer replaces in training, through autograd: fwd = F.linear(x, W, b)
                   under no_grad, fwd_bwd = torch.autograd.grad(F.linear(x, W, b), x, dy). Same GPU work as the
                   floor; its wall time adds autograd's host time, which every trainable layer pays (at small M
                   that host time, not the GPU, sets the wall time).
  lorafusion       the peer LoRAFusion (CentML/lorafusion c48d7fd) lora_v1.fused_linear_lora, adapters in x's dtype;
                   loaded by bench/suite/peer_lorafusion.py from $LORAFUSION_DIR or <repo>/.peers/lorafusion (git-ignored,
                   filled by bench/tools/get_lorafusion.sh).

DoRA providers (``--dora``; same inputs, plus a magnitude set to PEFT's init value ‖W + s·B A‖_row)
  ours-dora-<backend>  lora_kernels.dora_linear(..., backend=<backend>), adapters and magnitude in adapter_dtype:
                       the defaults (p = 0: the output y kept for the backward, z = (y - b)/g; p > 0: z recomputed).
  ours-dora-<backend>-recompute
                       lora_kernels.dora.SAVE_Y off: z recomputed at p = 0 too (one GEMM more, nothing M×N saved).
  ours-dora-cuda-py     the cuda backend with its C++ DoRA entry switched off (the Python path of lora_kernels/dora.py
                       around the same kernels; for host-time A/B).
  ours-dora-<backend>-savez
                       the same with lora_kernels.dora.SAVE_Z (z saved for backward: one GEMM fewer, M×N more saved).
  peft-dora            a real peft lora.Linear with use_dora=True (default config: fp32 adapters), lora_dropout=p.

Modes: ``fwd`` runs under torch.no_grad (training-mode dropout still applied); ``fwd_bwd`` has x, A, B
requiring grad, W frozen, and back-propagates a fixed random dy with torch.autograd.grad (no .grad
accumulation).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton", "cuda")
PROVIDERS = tuple(f"ours-{b}" for b in BACKENDS) + (
    "peft-layer", "formula-bf16", "compile-formula", "addmm", "cublas-base", "linear-autograd", "lorafusion")
FLOOR = "cublas-base"
PEFT_REF = "peft-layer"
DORA_PROVIDERS = tuple(f"ours-dora-{b}" for b in BACKENDS) + (
    "ours-dora-cuda-recompute", "ours-dora-triton-recompute", "ours-dora-cuda-savez", "ours-dora-triton-savez",
    "ours-dora-cuda-py", "peft-dora")
DORA_PEFT_REF = "peft-dora"
SCALING = 2.0  # lora_alpha = 2 r


class Unavailable(Exception):
    """The provider cannot run here (backend not built, no GPU, ...)."""


@dataclasses.dataclass
class Case:
    provider: str
    fwd: list
    fwd_bwd: list
    flops_fwd: float
    flops_fwd_bwd: float
    exclude: list          # parameters / weights: not counted as saved activations
    inputs: list           # layer inputs x (first set)
    note: str = ""
    adapter_dtype: str = ""


def lora_flops(M, K, N, r, mode):
    fwd = 2.0 * M * K * N + 2.0 * M * K * r + 2.0 * M * r * N
    if mode == "fwd":
        return fwd
    # bwd: dx = dy W (2MNK) + g = dy B (2MNr) + dB = dyᵀ u (2MNr) + dA = gᵀ x (2MrK) + g A (2MrK)
    return fwd + 2.0 * M * N * K + 4.0 * M * N * r + 4.0 * M * r * K


def base_flops(M, K, N, mode):
    return 2.0 * M * K * N * (1 if mode == "fwd" else 2)


def formula(x, W, b, A, B, s: float, p: float):
    h = F.dropout(x, p, True) if p > 0 else x
    return F.linear(x, W, b) + s * F.linear(F.linear(h, A), B)


def _make_tensors(M, K, N, r, dtype, adapter_dtype, device, bias, gen):
    def rn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dt)

    return {
        "x": rn(M, K).requires_grad_(True),
        "W": rn(N, K, std=K ** -0.5),
        "b": rn(N, std=0.1) if bias else None,
        "A": rn(r, K, dt=adapter_dtype, std=K ** -0.5).requires_grad_(True),
        "B": rn(N, r, dt=adapter_dtype, std=r ** -0.5).requires_grad_(True),
        "dy": rn(M, N),
    }


def set_bytes(M, K, N, r, dtype, bias=False):
    es = torch.tensor([], dtype=dtype).element_size()
    return es * (M * K + N * K + 2 * M * N + (N if bias else 0)) + 4 * r * (K + N)


def _add_modes(fwds: list, fwd_bwds: list, call: Callable, wrt: tuple, dy) -> None:
    """Append a provider's two timed callables: forward without autograd, and forward plus the grads of
    ``wrt`` for the upstream gradient ``dy``. The latter carries, as its ``autograd_dy`` attribute, the same
    fwd+bwd with dy arriving as the grad of (y ⊙ dy).sum(), made by autograd: a layer may overwrite such a grad
    (DoRA's C++ node does), never the caller's; the grid measures peak memory both ways."""
    def fwd():
        with torch.no_grad():
            return call()

    def fwd_bwd():
        return torch.autograd.grad(call(), wrt, dy)

    def fwd_bwd_autograd_dy():  # for memory only: y's grad made by autograd (as in a network), not the caller's;
        y = call()                # y held here, as fwd_bwd's caller holds it
        return torch.autograd.grad((y * dy).sum(), wrt)

    fwd_bwd.autograd_dy = fwd_bwd_autograd_dy
    fwds.append(fwd)
    fwd_bwds.append(fwd_bwd)


_COMPILED_DYNAMIC: dict = {}  # compile mode -> torch.compile(formula, dynamic=True), shared by every case


def make_case(provider: str, M: int, K: int, N: int, r: int, p: float, dtype=torch.bfloat16, device="cuda",
              bias: bool = False, n_sets: int = 1, compile_mode: str = "max-autotune-no-cudagraphs",
              adapter_dtype=torch.float32, scaling: float = SCALING, seed: int = 0,
              compile_dynamic: bool = False, b_scale: float = 1.0) -> Case:
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    s, note = float(scaling), ""
    if provider in ("formula-bf16", "compile-formula", "addmm", "cublas-base", "linear-autograd", "lorafusion"):
        adapter_dtype = dtype
    sets = [_make_tensors(M, K, N, r, dtype, adapter_dtype, device, bias, gen) for _ in range(max(1, n_sets))]
    for t in sets if b_scale != 1.0 else ():  # lora_B's size against W's (DoRA's saved-y rule reads it)
        t["B"] = (t["B"].detach() * b_scale).requires_grad_(True)
    fwds: list[Callable] = []
    fwd_bwds: list[Callable] = []
    exclude: list = []
    flops = (lora_flops(M, K, N, r, "fwd"), lora_flops(M, K, N, r, "fwd_bwd"))

    if provider.startswith("ours-dora-") or provider == "peft-dora":
        _dora_case(provider, sets, fwds, fwd_bwds, exclude, K, N, r, p, s, bias, device)
        note = f"DoRA, adapters {str(adapter_dtype).replace('torch.', '')}"

    elif provider.startswith("ours-"):
        backend = provider[len("ours-"):]
        try:
            import lora_kernels
        except Exception as e:  # pragma: no cover
            raise Unavailable(f"import lora_kernels failed: {e}")
        avail = lora_kernels.available_backends()
        if backend not in avail:
            raise Unavailable(f"backend {backend!r} not available (available: {avail})")
        op = lora_kernels.lora_linear
        note = f"adapters {str(adapter_dtype).replace('torch.', '')}"
        for t in sets:
            _add_modes(fwds, fwd_bwds, lambda t=t: op(t["x"], t["W"], t["b"], t["A"], t["B"], s, dropout_p=p,
                                                      training=True, backend=backend),
                       (t["x"], t["A"], t["B"]), t["dy"])
            exclude += [t["W"], t["b"], t["A"], t["B"]]

    elif provider == "peft-layer":
        note = "real peft lora.Linear, default config (fp32 adapters)"
        for t in sets:
            layer = _peft_layer(t, K, N, r, s, p, bias, device)
            la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            note = f"real peft lora.Linear, adapters {str(la.dtype).replace('torch.', '')}"
            _add_modes(fwds, fwd_bwds, lambda t=t, layer=layer: layer(t["x"]), (t["x"], la, lb), t["dy"])
            exclude += [pp for pp in t["_module"].parameters()]

    elif provider in ("formula-bf16", "compile-formula"):
        fn = formula
        if provider == "compile-formula" and compile_dynamic:
            # One symbolic-shape graph serves every shape (a full grid would otherwise compile 96 times).
            if compile_mode not in _COMPILED_DYNAMIC:
                _COMPILED_DYNAMIC[compile_mode] = torch.compile(formula, mode=compile_mode, dynamic=True)
            fn = _COMPILED_DYNAMIC[compile_mode]
            note = f"torch.compile mode={compile_mode}, dynamic shapes"
        elif provider == "compile-formula":
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no automatic-dynamic shapes
            fn = torch.compile(formula, mode=compile_mode, dynamic=False)
            note = f"torch.compile mode={compile_mode}"
        for t in sets:
            _add_modes(fwds, fwd_bwds, lambda t=t: fn(t["x"], t["W"], t["b"], t["A"], t["B"], s, p),
                       (t["x"], t["A"], t["B"]), t["dy"])
            exclude += [t["W"], t["b"], t["A"], t["B"]]

    elif provider == "addmm":
        note = "no dropout (p ignored)"

        def run(t):
            out = F.linear(t["x"], t["W"], t["b"])
            return out.addmm_(t["x"] @ t["A"].t(), t["B"].t(), alpha=s)

        for t in sets:
            _add_modes(fwds, fwd_bwds, lambda t=t: run(t), (t["x"], t["A"], t["B"]), t["dy"])
            exclude += [t["W"], t["b"], t["A"], t["B"]]

    elif provider == "cublas-base":
        note = "floor: F.linear(x, W) [+ dy @ W]"
        flops = (base_flops(M, K, N, "fwd"), base_flops(M, K, N, "fwd_bwd"))
        for t in sets:
            xd = t["x"].detach()

            def fwd(xd=xd, t=t):
                return F.linear(xd, t["W"])

            def fwd_bwd(xd=xd, t=t):
                y = F.linear(xd, t["W"])
                return y, t["dy"] @ t["W"]

            fwds.append(fwd)
            fwd_bwds.append(fwd_bwd)
            exclude += [t["W"]]
    elif provider == "linear-autograd":
        note = "F.linear(x, W, b) through autograd (grad of x)"
        flops = (base_flops(M, K, N, "fwd"), base_flops(M, K, N, "fwd_bwd"))
        for t in sets:
            _add_modes(fwds, fwd_bwds, lambda t=t: F.linear(t["x"], t["W"], t["b"]), (t["x"],), t["dy"])
            exclude += [t["W"], t["b"]]
    elif provider == "lorafusion":
        import peer_lorafusion

        try:
            lf = peer_lorafusion.prepare(device, sets[0]["W"], sets[0]["A"], sets[0]["B"], s, p)
        except peer_lorafusion.LoRAFusionUnavailable as e:
            raise Unavailable(str(e)) from None
        note = lf.note
        for t in sets:
            fwd, fwd_bwd, _ = lf.callables(t["x"], t["W"], t["A"], t["B"], t["dy"], t["b"])
            fwds.append(fwd)
            fwd_bwds.append(fwd_bwd)
            exclude += [t["W"], t["b"], t["A"], t["B"]]
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")

    return Case(provider, fwds, fwd_bwds, flops[0], flops[1], [e for e in exclude if e is not None],
                [sets[0]["x"]], note, str(adapter_dtype).replace("torch.", ""))


def _peft_layer(t, K, N, r, s, p, bias, device, use_dora=False):
    """PEFT's own lora.Linear (default config; DoRA with use_dora) on a one-layer model, holding the case's W, b, A, B
    (and magnitude t["m"]). The model is kept alive in t["_module"]; returns the layer."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(K, N, bias=bias, device=device, dtype=t["W"].dtype)

    cfg = LoraConfig(r=r, lora_alpha=int(round(s * r)), lora_dropout=p, target_modules=["lin"], use_dora=use_dora)
    pm = get_peft_model(One(), cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(t["W"])
        if bias:
            layer.base_layer.bias.copy_(t["b"])
        layer.lora_A["default"].weight.copy_(t["A"])
        layer.lora_B["default"].weight.copy_(t["B"])
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(t["m"])
    pm.train()
    t["_module"] = pm  # keep alive
    return layer


def _dora_case(provider, sets, fwds, fwd_bwds, exclude, K, N, r, p, s, bias, device):
    """DoRA providers: the magnitude is PEFT's init value for these W, A, B (so both compute the same layer)."""
    try:
        import lora_kernels
        from lora_kernels.dora import dora_weight_norm
    except Exception as e:  # pragma: no cover
        raise Unavailable(f"import lora_kernels failed: {e}")
    for t in sets:
        t["m"] = dora_weight_norm(t["W"], t["A"], t["B"], s).to(t["A"].dtype).requires_grad_(True)
    if provider.startswith("ours-dora-"):
        backend = provider[len("ours-dora-"):]
        save_z, recompute, py = backend.endswith("-savez"), backend.endswith("-recompute"), backend.endswith("-py")
        backend = backend.rsplit("-", 1)[0] if (save_z or recompute or py) else backend
        if backend not in lora_kernels.available_backends():
            raise Unavailable(f"backend {backend!r} not available (available: {lora_kernels.available_backends()})")
        from lora_kernels import dora

        be = lora_kernels._dispatch.get(backend)

        def call(t, save_z=save_z, save_y=not recompute, backend=backend):
            # read by the forward only (the backward follows its ctx); -py: the C++ entry switched off
            before, dora.SAVE_Z, dora.SAVE_Y = (dora.SAVE_Z, dora.SAVE_Y), save_z, save_y
            entry = getattr(be, "dora_entry", None)
            if py:
                be.dora_entry = None
            try:
                return lora_kernels.dora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], s, t["m"], dropout_p=p,
                                                training=True, backend=backend)
            finally:
                dora.SAVE_Z, dora.SAVE_Y = before
                if py:
                    be.dora_entry = entry

        for t in sets:
            _add_modes(fwds, fwd_bwds, lambda t=t: call(t), (t["x"], t["A"], t["B"], t["m"]), t["dy"])
            exclude += [t["W"], t["b"], t["A"], t["B"], t["m"]]
        return
    for t in sets:
        layer = _peft_layer(t, K, N, r, s, p, bias, device, use_dora=True)
        la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        mag = layer.lora_magnitude_vector["default"].weight
        _add_modes(fwds, fwd_bwds, lambda t=t, layer=layer: layer(t["x"]), (t["x"], la, lb, mag), t["dy"])
        exclude += [pp for pp in t["_module"].parameters()]
