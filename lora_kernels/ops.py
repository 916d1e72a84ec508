"""The op contract: the public functional op, its input checks, its torch.library registration
(schema, fake impls, autograd) and the dropout seeding.

    y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ

Two ops are registered in the ``lora_kernels`` namespace:

    lora_fwd(x, weight, bias?, lora_A, lora_B, scaling, p, seed?, offset, backend) -> (y, u)
    lora_bwd(dy, x, weight, lora_A, lora_B, u, scaling, p, seed?, offset, backend, need_dx, need_dA, need_dB)
        -> (dx, dA, dB)          (a grad that is not needed comes back as an empty tensor)

with x and dy 2-D; ``u = scaling · dropout(x) Aᵀ`` (M, r) in float32 is the only activation saved besides x:
the dropout mask is regenerated from ``seed`` (a 0-d int64 tensor drawn from torch's RNG) and ``offset``, never
stored. Without dropout (p = 0) ``lora_linear`` passes no seed (None): no tensor that is not an input of the
layer enters a compiled graph or is saved for backward (see ``lora_linear``). The backends' math contract is in
``lora_kernels/backends/__init__.py``.

Where the seed lives:
- eager calls: on the CPU, drawn from torch's default CPU generator (``torch.manual_seed`` reproduces a run,
  ``record_dropout`` reports it as an int); the backends get it as a Python int (no device read).
- CUDA graph capture (``torch.cuda.graph``) and ``torch.compile`` (whose ``mode="reduce-overhead"`` records CUDA
  graphs): on x's device, drawn by ``torch.randint`` from the device generator, and the kernels read it from device
  memory when they run. Drawing on the device is graph-safe the way PyTorch's own dropout is: a captured draw
  advances the generator's Philox offset on every replay, so each replay gets a fresh seed and a fresh mask. A value
  baked into a captured kernel's arguments would repeat the same mask on every replay. A backend that could not
  read a device seed (not in ``_dispatch.DEVICE_SEED_BACKENDS``; today every backend can) would raise under capture
  instead, and ``backend=None`` would skip it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.autograd.forward_ad as _fwAD

from . import _config, _dispatch

MAX_RANK = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: torch backend only
_SEED_HIGH = 2**62

# --------------------------------------------------------------------------------------------- dropout seeds
# The open record_dropout blocks of every thread, as (thread id, list): a call records into its own thread's. (That
# any block is open anywhere is what the fast paths test, one falsy check per call.)
_recorders: list[tuple] = []


@contextlib.contextmanager
def record_dropout():
    """Collects (seed, offset) of every call with active dropout made inside the block (eager mode):

        with lora_kernels.record_dropout() as calls:
            y = lora_linear(x, ..., dropout_p=0.1)
        seed, offset = calls[0]
        keep = lora_kernels.dropout_mask(seed, offset, x.shape, 0.1)

    Calls captured into a CUDA graph record their seed as the 0-d int64 device tensor that each replay refills:
    ``dropout_mask`` takes it as is, and ``int(seed)`` after a replay gives that replay's seed.
    """
    calls: list = []
    entry = (threading.get_ident(), calls)
    _recorders.append(entry)
    try:
        yield calls
    finally:
        _recorders.remove(entry)


def _record(seed) -> None:
    """Records a dropout call's (seed, offset 0) in the current thread's open record_dropout blocks: a CPU seed as
    its int, a device seed as the tensor (its value is known once the call ran)."""
    me = threading.get_ident()
    for tid, calls in _recorders:
        if tid == me:
            calls.append((int(seed) if seed.is_cpu else seed, 0))


def _draw_seed(device=None) -> torch.Tensor:
    """A fresh Philox key in [0, 2^62): from torch's default CPU generator (torch.manual_seed reproduces a run), or,
    given a device, from that device's generator without a host round trip (the graph-safe form)."""
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------------- the ops
_lib = torch.library.Library("lora_kernels", "DEF")
_lib.define(
    "lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float p, "
    "Tensor? seed, int offset, str backend) -> (Tensor, Tensor)"
)
_lib.define(
    "lora_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, float scaling, "
    "float p, Tensor? seed, int offset, str backend, bool need_dx, bool need_dA, bool need_dB) "
    "-> (Tensor, Tensor, Tensor)"
)


def _backend_seed(seed: torch.Tensor, p: float):
    """The Philox key as the backends take it: a Python int for a CPU seed (reading a CPU tensor is no device
    sync), the 0-d device tensor itself for a device seed (read by the kernels at run time), 0 without dropout
    (where the seed may be None)."""
    if p == 0.0:
        return 0
    if seed is None:
        raise ValueError("lora_kernels: dropout (p > 0) needs a seed tensor, got None")
    return int(seed) if seed.is_cpu else seed


def _fwd_impl(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend):
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0]), x.new_empty(0, lora_A.shape[0], dtype=_u_dtype(x))
    return _dispatch.get(backend).forward(
        x, weight, bias, lora_A, lora_B, scaling, p, _backend_seed(seed, p), offset)


def _bwd_grads(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, backend, need_dx, need_dA, need_dB):
    """(dx, dA, dB), each None when not needed."""
    if not (need_dx or need_dA or need_dB):  # only a trainable base weight or bias asks (_base_grads)
        return None, None, None
    if x.shape[0] == 0:
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(lora_A) if need_dA else None,
                torch.zeros_like(lora_B) if need_dB else None)
    return _dispatch.get(backend).backward(
        dy, x, weight, lora_A, lora_B, u, scaling, p, _backend_seed(seed, p), offset, need_dx, need_dA, need_dB)


def _bwd_impl(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, backend, need_dx, need_dA, need_dB):
    dx, dA, dB = _bwd_grads(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, backend, need_dx, need_dA,
                            need_dB)
    # Grads not asked for come back as empty tensors, a distinct one per output (outputs of a custom op must not
    # alias each other).
    return (dx if need_dx else x.new_empty(0), dA if need_dA else x.new_empty(0), dB if need_dB else x.new_empty(0))


_lib.impl("lora_fwd", _fwd_impl, "CompositeExplicitAutograd")
_lib.impl("lora_bwd", _bwd_impl, "CompositeExplicitAutograd")


def _u_dtype(x):
    """dtype of the saved activation u: float32 (float64 for float64 inputs, on the torch backend)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("lora_kernels::lora_fwd")
def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0], dtype=_u_dtype(x))


@torch.library.register_fake("lora_kernels::lora_bwd")
def _bwd_fake(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, backend, need_dx, need_dA, need_dB):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(lora_A) if need_dA else x.new_empty(0),
            torch.empty_like(lora_B) if need_dB else x.new_empty(0))


# ------------------------------------------------------------------------------------------------ autograd
# The autograd of lora_fwd, defined once: _setup_context saves what backward needs, _backward routes dy to the grads
# each input needs. Two registrations run it: register_autograd on the op (what torch.compile records), and
# _EagerLoRA for eager calls. The cuda backend's C++ node (csrc/lora_autograd.h) is the same routing of (dx, dA, dB)
# written in C++, so that its backward runs no Python; it covers a frozen weight and bias only (lora_linear sends a
# trainable base here, so dW and db are defined once, in _base_grads); tests/test_contract.py checks that it gives
# the same grads bit for bit.
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.args = (scaling, p, offset, backend, bias is not None)


def _base_grads(dy, x, weight, need_dW: bool, need_db: bool):
    """(dW, db) of a trainable base weight and bias, each None when not needed: dW = dyᵀ x, db = Σ_m dy, accumulated
    in float32 (float64 for float64 inputs). Outside the fused fast path (the base is frozen in LoRA training):
    plain PyTorch math, correct for every backend."""
    if not (need_dW or need_db):  # the frozen base of LoRA training
        return None, None
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dW = (dy.t().to(acc) @ x.to(acc)).to(weight.dtype) if need_dW else None
    db = dy.to(acc).sum(0).to(dy.dtype) if need_db else None
    return dW, db


def _backward(ctx, dy, _du, bwd=None):
    """The grads of lora_fwd's inputs. ``bwd`` computes (dx, dA, dB): the registered lora_bwd op by default (what
    torch.compile records), ``_bwd_grads`` from eager calls."""
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    scaling, p, offset, backend, has_bias = ctx.args
    need_dx, need_dW, need_db, need_dA, need_dB = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx, dA, dB = (bwd or torch.ops.lora_kernels.lora_bwd)(
        dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, backend, need_dx, need_dA, need_dB)
    dW, db = _base_grads(dy, x, weight, need_dW, need_db and has_bias)
    return (dx if need_dx else None, dW, db, dA if need_dA else None, dB if need_dB else None,
            None, None, None, None, None)


torch.library.register_autograd("lora_kernels::lora_fwd", _backward, setup_context=_setup_context)


class _EagerLoRA(torch.autograd.Function):
    """Eager-mode registration of the same autograd: ``lora_fwd``'s impl, ``_setup_context`` and ``_backward``,
    called without the dispatcher's Python autograd wrapper around the op. That wrapper costs more host time per
    call than the backend call itself (tens of microseconds), which decides the speed of small-M calls and of whole
    training steps. ``lora_linear`` uses it (through ``_eager_apply``) unless torch.compile is tracing, where the
    registered op (fake impls, opaque to dynamo) is what the graph records, or the backend brings its own autograd
    node (the cuda backend's, in C++) and the base weight and bias are frozen. tests/test_contract.py checks that all
    paths give bit-identical outputs and grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend):
        y, u = _fwd_impl(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend), (y, u))
        return y

    @staticmethod
    def backward(ctx, dy):
        # The kernels record no graph: under create_graph=True the grads come back first-order (first_order), so a
        # double backward raises instead of giving wrong numbers.
        if torch.is_grad_enabled():
            with torch.no_grad():
                grads = _backward(ctx, dy, None, bwd=_bwd_grads)
            return first_order(grads, dy, *ctx.saved_tensors[:4])  # x, weight, lora_A, lora_B
        return _backward(ctx, dy, None, bwd=_bwd_grads)


class _NotTwiceDifferentiable(torch.autograd.Function):
    """A grad computed under create_graph=True (csrc/lora_autograd.h has the C++ twin): its value, connected to dy and
    to the op's inputs, so that differentiating it again with respect to any of them reaches this node and raises.
    (torch's once_differentiable connects its error node to nothing that the grad depends on: a second derivative
    with respect to an input came back as "not used in the graph", or as None with allow_unused=True.)"""

    @staticmethod
    def forward(ctx, grad, *connected):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("lora_kernels: the backward of the fused LoRA ops is not differentiable (double backward "
                           "through lora_linear or dora_linear is not supported)")


def first_order(grads, dy, *inputs):
    """A backward's grads under create_graph=True: each tensor wrapped in _NotTwiceDifferentiable (its first-order
    value; a second order raises a clear error)."""
    connected = tuple(t for t in (dy, *inputs) if isinstance(t, torch.Tensor))
    return tuple(_NotTwiceDifferentiable.apply(g, *connected) if isinstance(g, torch.Tensor) else g for g in grads)


# autograd.Function.apply is a Python wrapper around the C apply: it binds default arguments (only for a Function
# with its own setup_context, which _EagerLoRA has not), routes calls under functorch transforms (which never reach
# _eager_apply: transform_backend sends them to the composite path), and otherwise unwraps the "dead" functorch
# wrappers among the arguments (tensors that escaped an earlier transform) before the C apply. _eager_apply does the
# same with one C call per tensor instead of a generator over all ten arguments: a few microseconds of host time per
# call. Where this torch lacks the unwrapping, Function.apply itself.
_C_APPLY = super(torch.autograd.Function, _EagerLoRA).apply
try:  # the unwrapping that Function.apply does (torch._functorch.utils.unwrap_dead_wrappers), one tensor at a time
    from torch._functorch.utils import unwrap_if_dead as _UNWRAP_IF_DEAD
except ImportError:
    _UNWRAP_IF_DEAD = None
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _eager_apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend):
    """_EagerLoRA.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend)."""
    if _UNWRAP_IF_DEAD is None:
        return _EagerLoRA.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset, backend)
    un = _UNWRAP_IF_DEAD
    return _C_APPLY(un(x), un(weight), None if bias is None else un(bias), un(lora_A), un(lora_B), scaling, p,
                    None if seed is None else un(seed), offset, backend)


# ------------------------------------------------------------------------------------------ the public op
# Backend resolution depends only on constants (the requested name, the device type, float64 or not) and may
# import a backend module, which dynamo cannot trace: under torch.compile it runs once at trace time and its
# result enters the graph as a constant.
@torch.compiler.assume_constant_result
def _resolve(requested, device_type: str, float64: bool, device_seed: bool) -> str:
    # (a plain function: dynamo unwraps lru_cache)
    return _dispatch.resolve(requested, device_type, float64, device_seed)


def dtype_problem(x_dtype, weight_dtype, bias_dtype, lora_A_dtype, lora_B_dtype):
    """Why this dtype combination is not accepted by the op (a message), or None when it is."""
    if torch.compiler.is_compiling():  # dynamo traces the plain function (it warns on every lru_cache call)
        return _dtype_problem(x_dtype, weight_dtype, bias_dtype, lora_A_dtype, lora_B_dtype)
    return _dtype_problem_cached(x_dtype, weight_dtype, bias_dtype, lora_A_dtype, lora_B_dtype)


def _dtype_problem(x_dtype, weight_dtype, bias_dtype, lora_A_dtype, lora_B_dtype):
    for name, dt in (("x", x_dtype), ("weight", weight_dtype), ("lora_A", lora_A_dtype), ("lora_B", lora_B_dtype)):
        if dt not in SUPPORTED_DTYPES:
            return f"{name} has unsupported dtype {dt}; expected one of float16, bfloat16, float32 (float64 on the torch backend)"
    if weight_dtype != x_dtype:
        return f"weight dtype {weight_dtype} must match x dtype {x_dtype} (as F.linear requires)"
    if bias_dtype is not None and bias_dtype != x_dtype:
        return f"bias dtype {bias_dtype} must match x dtype {x_dtype}"
    for name, dt in (("lora_A", lora_A_dtype), ("lora_B", lora_B_dtype)):
        if dt not in (torch.float32, x_dtype):
            return f"{name} dtype {dt} must be float32 or x's dtype {x_dtype}"
    return None


_dtype_problem_cached = functools.lru_cache(maxsize=256)(_dtype_problem)


def _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Raises ValueError with the reason when the arguments are not a valid call. A valid call's common form (tensors
    of matching shapes on one device, a float or int scaling) passes one chain of cheap comparisons, a few
    microseconds of host time less per call; anything else, valid or not, goes through ``_explain``'s checks."""
    T = torch.Tensor
    try:
        ws, As = weight.shape, lora_A.shape
        if (type(scaling) in (float, int) and math.isfinite(scaling) and 0.0 <= dropout_p <= 1.0
                and isinstance(x, T) and isinstance(weight, T) and isinstance(lora_A, T) and isinstance(lora_B, T)
                and len(ws) == 2 and len(As) == 2 and x.dim() >= 1 and x.shape[-1] == ws[1] == As[1]
                and 1 <= As[0] <= MAX_RANK and lora_B.shape == (ws[0], As[0])
                and (bias is None or (isinstance(bias, T) and bias.shape == (ws[0],)))):
            dev, strided = x.device, torch.strided
            if (weight.device == dev and lora_A.device == dev and lora_B.device == dev
                    and (bias is None or bias.device == dev)
                    and x.layout is strided and weight.layout is strided and lora_A.layout is strided
                    and lora_B.layout is strided and (bias is None or bias.layout is strided)
                    and dtype_problem(x.dtype, weight.dtype, None if bias is None else bias.dtype, lora_A.dtype,
                                      lora_B.dtype) is None):
                return
    except Exception:  # an argument of another kind: _explain names it
        pass
    _explain(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


def _explain(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """_check's full checks, one by one, each with its message."""
    def fail(msg):
        raise ValueError(f"lora_linear: {msg}")

    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        fail(f"bias must be a Tensor or None, got {type(bias).__name__}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.layout != torch.strided:  # sparse, mkldnn: the kernels read dense strided memory
            fail(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    problem = dtype_problem(x.dtype, weight.dtype, None if bias is None else bias.dtype, lora_A.dtype, lora_B.dtype)
    if problem is not None:
        fail(problem)
    if x.dim() < 1:
        fail("x must have shape (..., K), got a 0-d tensor")
    if weight.dim() != 2:
        fail(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        fail(f"x's last dim {x.shape[-1]} does not match weight's in_features K={K} (weight shape {tuple(weight.shape)})")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        fail(f"lora_A must have shape (r, K={K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if not 1 <= r <= MAX_RANK:
        fail(f"unsupported rank r={r} (lora_A's first dim); supported: 1 <= r <= {MAX_RANK}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        fail(f"lora_B must have shape (N={N}, r={r}), got {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        fail(f"bias must have shape (N={N},), got {tuple(bias.shape)}")
    dev = x.device
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != dev:
            fail(f"{name} is on {t.device} but x is on {dev}; all tensors must be on one device")
    try:
        p_ok = bool(0.0 <= dropout_p <= 1.0)
    except (TypeError, RuntimeError):  # None, a string, a tensor of several elements
        fail(f"dropout_p must be a number in [0, 1], got {type(dropout_p).__name__}")
    if not p_ok:
        fail(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(scaling, (int, float)):
        fail(f"scaling must be a Python number, got {type(scaling).__name__}")
    try:
        finite = math.isfinite(scaling)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        fail(f"scaling must be finite, got {scaling if isinstance(scaling, float) else 'an int past float range'}")


def transform_backend(requested, op: str, *tensors) -> tuple:
    """(backend, composite) of a call. Forward-mode AD (a dual level open and a tangent on one of ``tensors``) and the
    torch.func transforms (grad, vmap, jvp, jacrev, ... : per-sample gradients, for one) are carried only by plain
    PyTorch ops: the fused kernels return no tangent, and the autograd.Function of the eager path has no jvp nor
    vmap rule. Under them the call runs the torch backend's math as plain ops (composite = True), which the
    transform differentiates or batches itself; None/'auto' then take the torch backend, and a fused backend named
    explicitly is an error. Elsewhere (requested, False). Random ops under vmap follow vmap's ``randomness`` rule:
    dropout there raises unless the caller chose one."""
    if torch.compiler.is_compiling():
        return requested, False
    if not (_FUNCTORCH_ACTIVE is not None and _FUNCTORCH_ACTIVE()):
        if _fwAD._current_level < 0 or not any(
                isinstance(t, torch.Tensor) and _fwAD.unpack_dual(t).tangent is not None for t in tensors):
            return requested, False
    name = requested if requested not in (None, "auto") else (_config.backend() or "auto")
    if name in ("auto", "torch"):
        return "torch", True
    raise NotImplementedError(f"{op}: forward-mode AD and torch.func transforms run on the torch backend only "
                              f"(plain PyTorch ops); backend '{name}' cannot carry them (use backend='torch' or None)")


def autocast_dtype(x: torch.Tensor):
    """The autocast dtype of x's device where autocast is on there, else None ('meta' has no autocast: asking
    about it raises)."""
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def autocast_inputs(x, weight, bias):
    """(x, weight, bias) as F.linear takes them under autocast: in ``autocast_dtype(x)`` where there is one, else as
    given. Arguments that are not tensors are left as they are, for the checks to name."""
    dt = autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    if dt is None:
        return x, weight, bias
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) else t for t in (x, weight, bias))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None):
    """Fused LoRA linear: ``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with PEFT's dropout semantics.

    x: (..., K); weight: (N, K) (frozen in the fast path); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r),
    adapters in float32 or x's dtype. Returns (..., N) in x's dtype. Dropout applies to the LoRA path only, with
    inverted scaling 1/(1-p), when ``training`` and ``dropout_p > 0``; its mask is ``dropout_mask(seed, offset, ...)``
    for a seed drawn from torch's RNG (see ``record_dropout``); ``dropout_p = 1`` drops everything (the LoRA path
    and its grads are zero). ``scaling`` must be finite. Tensors on 'meta' propagate shapes (torch backend).
    ``backend``: None/'auto', 'torch', 'triton', 'cuda'.
    """
    backend, composite = transform_backend(backend, "lora_linear", x, weight, bias, lora_A, lora_B)
    # The whole call in C++ where the backend has an entry for it (the cuda backend: csrc/lora_autograd.h,
    # lora_linear_entry): it declines (None) every call that it does not run as the code below would, and the code
    # below runs those. Not under torch.compile (the registered op is what a graph records) nor with record_dropout
    # (its list is Python's), nor under a functorch transform (vmap would hand it one sample at a time).
    if not _recorders and not composite and not torch.compiler.is_compiling():
        y = _dispatch.call_entry(backend, "linear_entry", x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                 training)
        if y is not None:
            return y
    x, weight, bias = autocast_inputs(x, weight, bias)  # behave like F.linear under autocast
    _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    device_type = x.device.type
    p = float(dropout_p) if training else 0.0
    if p == 1.0:  # everything dropped (PEFT allows p = 1): the LoRA path and its grads are zero
        scaling, p = 0.0, 0.0
    # the seed must live on x's device when torch.compile is tracing or a CUDA graph is being captured (see the
    # module docstring); is_compiling first: dynamo never sees the capture query
    compiling = torch.compiler.is_compiling()
    graph_rng = p > 0.0 and (compiling or (x.is_cuda and torch.cuda.is_current_stream_capturing()))
    name = _resolve(backend, device_type, x.dtype == torch.float64, graph_rng)
    if p == 0.0:
        # No seed at all (not a constant tensor): under torch.compile a module-level CPU tensor here became an input
        # of every compiled graph and, saved for backward, an output of the forward graph, and
        # mode="reduce-overhead" failed on it ("storage data ptrs are not allocated in pool"; tests/test_compile_cpu.py)
        seed = None
    elif graph_rng and name in _dispatch.DEVICE_SEED_BACKENDS:
        seed = _draw_seed(x.device)
    else:  # eager; or a backend without the device-seed path, which refuses to run under capture itself
        seed = _draw_seed()
    if p > 0.0 and _recorders:
        _record(seed)
    two_d = x.dim() == 2
    x2 = x if two_d else x.reshape(-1, x.shape[-1])
    args = (x2.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
            lora_A.contiguous(), lora_B.contiguous(), float(scaling), p, seed, 0, name)
    if composite:  # under forward AD or a torch.func transform: the torch backend's math as plain ops
        y = _dispatch.get("torch").forward(*args[:7], _backend_seed(seed, p), 0)[0]
    elif compiling:
        y = torch.ops.lora_kernels.lora_fwd(*args)[0]
    elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                      or lora_B.requires_grad or (bias is not None and bias.requires_grad)):
        # the backend's own autograd node (C++) covers a frozen weight and bias (LoRA's case): a trainable base goes
        # to _EagerLoRA, whose _backward holds the one definition of dW and db (_base_grads)
        cpp = (getattr(_dispatch.get(name), "linear_autograd", None)
               if x2.shape[0] and _config.CPP_AUTOGRAD and not weight.requires_grad
               and (bias is None or not bias.requires_grad) else None)
        if cpp is not None:  # no Python in forward's wrapper or backward
            y = cpp(*args[:6], p, _backend_seed(seed, p), 0)
        else:
            y = _eager_apply(*args)
    else:  # nothing to differentiate (inference, no_grad): the impl alone, without autograd.Function's overhead
        y = _fwd_impl(*args)[0]
    return y if two_d else y.reshape(*x.shape[:-1], weight.shape[0])


def dropout_mask(seed, offset, shape, p, device=None):
    """The keep-mask every backend uses for (seed, offset); see ``lora_kernels.philox``. ``seed``: an int, or a 0-d
    int64 tensor (a device seed recorded under CUDA graph capture is read on its device, without a host sync)."""
    from .philox import dropout_mask as _mask

    if isinstance(seed, torch.Tensor) and seed.is_cpu:
        seed = int(seed)
    return _mask(seed if isinstance(seed, torch.Tensor) else int(seed), int(offset), shape, float(p), device=device)
