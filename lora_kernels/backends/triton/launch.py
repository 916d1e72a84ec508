"""The host side of the Triton backend: ``forward`` and ``backward`` (the backend contract), whose passes (their
allocations, launches and torch ops) are recorded once per distinct call as a plan and replayed by later calls, and
``_launch`` (DoRA's passes), which relaunches compiled kernels without triton's per-launch JIT work."""
from __future__ import annotations

import collections
import dataclasses
import functools
import operator

import torch
import triton

from ... import _config
from ..._config import TritonKnobs
from ...philox import calls_per_row, keep_threshold
from .configs import (_cdiv, _dot_precision, _gemm_configs, _helper_tiles, _next_pow2, _num_sms, _rank_term_config,
                      _max_smem, _r_pad, _rank_f32, _small_m_heuristic, _smem_per_block, _splits, _stages,
                      _ELEMENTWISE_TILES, _TMA_AUTO_MAX_R_PAD,
                      _TMA_MAX_R_PAD, _TMA_MAX_R_PAD_F32, _TMA_SMEM, _tma_config, _tuned_gemm, _tuned_small_m)
from .kernels import (_PER_CALL_SCALARS, _dy_pass_kernel, _output_gemm_kernel, _output_gemm_tma_kernel,
                      _shrink_kernel, _small_m_kernel, _sum_partials_kernel)
from .kernels.dora_scale_bias import _scale_bias_kernel

try:  # host-side TMA descriptors (triton >= 3.4): the TMA output kernel's operands
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older triton: LORA_KERNELS_TRITON_MAINLOOP=tma falls back
    _TensorDescriptor = None

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
def _triton_version() -> tuple:
    try:
        return tuple(int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return ()


_TRITON_VERSION = _triton_version()


def _fast_launch_enabled() -> bool:
    return _config.TRITON_FAST_LAUNCH and (3, 6) <= _TRITON_VERSION <= (3, 9)


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


def _other_device(args) -> int | None:
    """The index of the CUDA device that the first tensor of ``args`` is on, where that is not the current device;
    else None. Triton launches on the current device and its current stream (JITFunction.run, and the launcher's
    stream argument here), whatever device the tensors are on; a call on tensors of another device (a model spread
    over GPUs by device_map="auto" leaves cuda:0 current) must make theirs current first, as torch's own ops do
    behind their device guard, or its kernels would run in the wrong context and out of order with torch's work on
    that device's stream."""
    for a in args:
        if isinstance(a, torch.Tensor):
            i = a.get_device()
            return None if i < 0 or i == torch.cuda.current_device() else i
    return None


def _launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs): runtime arguments positionally, constexprs and options by keyword; on the
    device of the first tensor argument."""
    other = _other_device(args)
    if other is not None:
        with torch.cuda.device(other):
            return _launch(kernel, grid, args, kwargs)
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


# Autotuned configs by problem key. The first call of a key runs triton's autotuner (a plan that does so is run once
# and not kept); the plans made later launch the chosen config directly, without the autotuner's per-call work.
_TUNED: dict = {}


# ----------------------------------------------------------------------------------------------------------
# Plans. What a call does (its allocations, its launches with their grids, arguments, constexprs and options, and
# the torch ops between them) is a function of its plan key alone: the shapes, strides, dtypes and 16-byte alignment
# of the tensors, the bias, dropout (p > 0), the grads needed, the knobs, x's device (the SM count sizes the splits;
# the outputs are allocated there), the kind of seed, and the module settings that tests patch (SMALL_M,
# _FUSE_DB_PARTIAL_RATIO, _TUNED and the kernels). The rest are the call's values: its tensors, the scale s/q, the
# dropout threshold, the seed, the offset (the per-call scalars of kernels._PER_CALL_SCALARS: no binary depends on
# them) and the stream.
#
# forward and backward look the key up, one dict lookup per call. On a miss, the planner (the passes below, written
# against _Planner) records the call's steps, each argument either a slot of the call's value list or a constant.
# Running a plan puts the call's values in the list and runs the steps. The first run on a (current) device
# launches through the JIT (kernel[grid](...)), which compiles or finds each binary; once every launch of the plan
# has its CompiledKernel there, later runs on that device hand each launcher its binary, grid and arguments
# directly, in the order the JIT passes them, as _launch's fast path does but without building a key per launch.
# The plan key and the device hold everything the JIT specializes on (every integer argument that is not a per-call
# scalar follows from the shapes, strides, knobs and SM count; the tensors are the inputs, whose dtype and alignment
# are in the key, fresh allocations, always aligned, and the seed's view, whose alignment is in the key), so a
# plan's binaries are the ones the JIT would pick (tests/test_triton_fast_launch.py). While a launch hook is
# installed (profilers do that) every launch takes the JIT's path, and so do the interpreter's and those of
# LORA_KERNELS_TRITON_FAST_LAUNCH=0.
# ----------------------------------------------------------------------------------------------------------
_PLAN_FAST = _FAST_LAUNCH and not _config.TRITON_INTERPRET  # plans may relaunch compiled kernels directly
_PLANS: dict = {}  # plan key -> _Plan
_MAX_PLANS = 4096  # distinct plan keys kept; beyond that the table restarts
_THRESHOLDS: dict = {}  # p -> keep_threshold(p)

# Slots of a call's value list: the call's values first (forward leaves _DY and _U empty), then the plan's tail
# (its temporaries, then its constants). _SEED_P is the seed's view in x's dtype (a device seed) or x (an int seed).
# _COMPILED: in a run through the JIT, the list where its launches put the CompiledKernels they ran (one per run:
# threads running a plan's first launches on different devices each get their own device's kernels). _DXF: dx's frozen
# product's left operand where it is not dy (backward_dx_from; empty otherwise). _CS: the forward's column scale
# (forward_scaled; empty otherwise).
(_X, _W, _BIAS, _A, _B, _DY, _U, _SCALE, _THR, _SEED, _SEED_P, _SEED_IN_MEM, _OFFSET, _STREAM, _SEED_RAW,
 _COMPILED, _DXF, _CS) = range(18)
_N_VALUES = 18


class _Val:
    """A value of a call as the planner sees it: its slot in the call's value list and, for a tensor, what the plan
    key fixes of it (shape, strides, dtype, device, whether its address is 16-byte aligned: fresh allocations are)."""
    __slots__ = ("slot", "shape", "_strides", "dtype", "device", "aligned")

    def __init__(self, slot: int, shape=None, strides=None, dtype=None, device=None, aligned=True):
        self.slot, self.shape, self._strides, self.dtype, self.device = slot, shape, strides, dtype, device
        self.aligned = aligned

    @classmethod
    def of(cls, slot: int, t: torch.Tensor) -> "_Val":
        return cls(slot, tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.data_ptr() % 16 == 0)

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def element_size(self) -> int:
        return self.dtype.itemsize


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _getter(slots: list):
    """A function of a value list that returns the values at `slots`, as a tuple."""
    if len(slots) <= 1:
        return (lambda v: ()) if not slots else (lambda v, i=slots[0]: (v[i],))
    return operator.itemgetter(*slots)


def _constexpr_names(kernel, n_args: int, kwargs: dict):
    """The names of `kernel`'s constexpr parameters, in order, when a launch with `n_args` runtime arguments and
    `kwargs` can take the fast path (a JIT kernel whose constexprs all follow its runtime parameters and are all
    given), else None."""
    if not (_PLAN_FAST and isinstance(kernel, _JIT_FUNCTION)):
        return None
    params = kernel.params
    n_runtime = sum(not p.is_constexpr for p in params)
    if n_runtime != n_args or any(p.is_constexpr for p in params[:n_runtime]):
        return None
    names = tuple(p.name for p in params[n_runtime:])
    return names if all(n in kwargs for n in names) else None


def _jit_launch_op(kernel, grid: tuple, args, kwargs: dict, i: int):
    """A step that launches through the JIT (kernel[grid](*args, **kwargs)) and keeps the CompiledKernel it ran, as
    the run's i-th."""
    def op(v):
        v[_COMPILED][i] = kernel[grid](*args(v), **kwargs)
    return op


def _fast_launch_op(c, grid: tuple, args, slots: list, descs: dict):
    """A step that hands the compiled kernel `c` to its launcher directly: the JIT's launch of it, with the runtime
    arguments and then the constexprs (``args``, which reads the value list at ``slots``), without launch metadata
    or hooks. Where triton 3.6's launcher would encode the TMA descriptors of leading descriptor arguments (``descs``:
    desc slot -> what the planner's "desc" step makes it from), the step encodes them itself, once per tensor
    address (_desc_launch_op). Returns (op, the desc slots it still reads)."""
    run, function, packed = c.run, c.function, c.packed_metadata
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    read = {s for s in slots if s in descs}
    direct = _c_launch(run)
    if direct is not None:  # what run(...) itself would call, without its Python frame
        launch, cooperative, pdl = direct
        encode = _tensordesc_launch(launch)
        if encode is not None:
            op = _desc_launch_op(encode, (g0, g1, g2, cooperative, pdl), function, packed, slots, descs)
            if op is not None:
                return op, set()

        def op(v):
            launch(g0, g1, g2, v[_STREAM], function, cooperative, pdl, None, None, packed, None, None, None,
                   *args(v))
        return op, read

    def op(v):
        run(g0, g1, g2, v[_STREAM], function, packed, None, None, None, *args(v))
    return op, read


def _no_launch_op(c, grid: tuple, args, slots: list, descs: dict):
    """_fast_launch_op's stand-in that launches nothing, with its return shape: what the host-time tools
    (bench/dev/triton_host_cpu.py --no-launch, bench/dev/host_trace.py) put in its place to time a call without its
    launches."""
    return (lambda v: None), set()


def _c_launch(launcher):
    """(launch, cooperative grid, PDL) of a triton 3.6 CudaLauncher that needs no scratch buffers, else None.

    Its __call__(gx, gy, gz, stream, function, *rest) allocates the global and profile scratch buffers (none when
    the kernel's sizes are 0, as for every kernel here) and then calls its C launch function as
    launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch, *rest): a Python frame,
    a closure and two calls, a few microseconds of host time per launch. Other triton versions arrange these
    arguments differently (3.9 passes the kernel's arguments as one tuple, after its signature): their launchers
    are called as they are."""
    if _TRITON_VERSION != (3, 6) or type(launcher).__name__ != "CudaLauncher":
        return None
    if type(launcher).__module__ != "triton.backends.nvidia.driver":
        return None
    try:
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        return launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
    except AttributeError:
        return None


# TMA descriptors. triton 3.6's launcher encodes every descriptor argument anew at each launch: its Python wrapper
# (driver.wrap_handle_tensordesc) calls make_tensordesc_arg, which has the driver encode the 128-byte CUtensorMap
# (cuTensorMapEncodeTiled) from the descriptor's tensor address, shape, strides and block, and the C launch copies
# those bytes into the kernel's parameters. In a plan everything but the address is fixed by the plan key, so
# _desc_launch_op keeps each encoding by address (a frozen weight's and an adapter's never change; activations come
# back to the few addresses the caching allocator hands out) and calls the C launch with them: the same arguments
# the wrapper would pass (tests/test_triton_fast_launch.py; the addresses: tests/test_triton_tma_mainloop.py), without
# encoding known ones again.
_MAX_DESC_ADDRESSES = 256  # encodings kept per descriptor argument of a plan's launch; beyond that they restart


def _tensordesc_launch(fn):
    """(C launch, descriptor argument positions, their TMA metadata, make_tensordesc_arg) where ``fn``, a triton 3.6
    CudaLauncher's launch (_c_launch), is the wrapper that encodes descriptor arguments around its C launch; else
    None (no descriptor arguments: fn is the C launch itself; or a wrapper of another shape)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None or code.co_name != "inner":
        return None
    try:
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in closure)))
        raw, positions, metas = cells["launcher"], cells["tensordesc_indices"], cells["tensordesc_meta"]
        make, base = fn.__globals__["make_tensordesc_arg"], fn.__globals__["_BASE_ARGS_FORMAT_LEN"]
    except (KeyError, ValueError):
        return None
    # metadata None: the wrapper passes the descriptor's tensor itself, nothing to keep
    if base != 13 or not callable(raw) or not metas or any(m is None for m in metas):
        return None
    return raw, sorted(positions), list(metas), make


def _desc_launch_op(encode, launch_dims: tuple, function, packed, slots: list, descs: dict):
    """The fast launch of a kernel whose leading arguments are all the TMA descriptors it takes (the TMA output
    kernel's a, b, c and, where they are descriptors, l and lb), each made by a planner "desc" step: the call's
    tensor at that step's slot, encoded once per address. ``launch_dims``: (grid x, y, z, cooperative grid, PDL).
    None where the arguments are not laid out so."""
    raw, positions, metas, make = encode
    n = len(positions)
    if positions != list(range(n)) or not all(s in descs for s in slots[:n]) or any(s in descs for s in slots[n:]):
        return None
    specs = [descs[s] for s in slots[:n]]  # (tensor slot, shape, strides, block, step) of each descriptor
    caches = [{} for _ in specs]
    rest = _getter(slots[n:])
    g0, g1, g2, cooperative, pdl = launch_dims

    def encoded(k: int, t: torch.Tensor) -> list:  # what the wrapper would pass for descriptor k: encoded anew
        cache = caches[k]
        if len(cache) >= _MAX_DESC_ADDRESSES:
            cache.clear()
        _, shape, strides, block, _ = specs[k]
        e = cache[t.data_ptr()] = make(_TensorDescriptor(t, list(shape), list(strides), list(block)), metas[k])
        return e

    pairs = [(k, spec[0], caches[k]) for k, spec in enumerate(specs)]

    def op(v):
        a = [g0, g1, g2, v[_STREAM], function, cooperative, pdl, None, None, packed, None, None, None]
        for k, slot, cache in pairs:
            t = v[slot]
            e = cache.get(t.data_ptr())
            a += e if e is not None else encoded(k, t)
        a += rest(v)
        raw(*a)
    return op


def _tune_op(key, tuner, grid, args, meta: dict):
    def op(v):  # the autotuner benchmarks the configs, then runs the best one: that is this call's launch
        tuner[grid](*args(v), **meta)
        _TUNED[key] = tuner.best_config
    return op


def _empty_op(i, shape, dtype, device):
    def op(v):
        v[i] = torch.empty(shape, dtype=dtype, device=device)
    return op


def _zero_op(i):
    def op(v):
        v[i].zero_()
    return op


def _addmm_op(c, a, b, transpose: bool):
    if transpose:
        def op(v):
            v[c].addmm_(v[a], v[b].t())
    else:
        def op(v):
            v[c].addmm_(v[a], v[b])
    return op


def _descriptors_by_copy() -> bool:
    """Whether a TensorDescriptor can be made without its constructor: a dataclass whose instances keep their fields
    in __dict__ (the defaults, padding and the like, read from the class). The constructor validates its arguments,
    about 2 us per descriptor; the planner has checked them once (_tma_unsupported), so replays skip it."""
    if _TensorDescriptor is None or not dataclasses.is_dataclass(_TensorDescriptor):
        return False
    try:
        t = torch.empty((8, 8), dtype=torch.float16)
        real = _TensorDescriptor(t, [8, 8], [8, 1], [8, 8])
        copy = object.__new__(_TensorDescriptor)
        copy.__dict__.update(base=t, shape=[8, 8], strides=[8, 1], block_shape=[8, 8])
        return all(getattr(copy, f.name) is getattr(real, f.name) or getattr(copy, f.name) == getattr(real, f.name)
                   for f in dataclasses.fields(_TensorDescriptor))
    except Exception:
        return False


_DESC_BY_COPY = _descriptors_by_copy()


def _desc_op(o, i, shape, strides, block):
    """A step that describes the call's tensor at slot i for TMA: a host-side TensorDescriptor (it holds the tensor,
    so it is made again on every run; the launcher encodes the TMA descriptor from it at each launch)."""
    shape, strides, block = list(shape), list(strides), list(block)
    if not _DESC_BY_COPY:
        def op(v):
            v[o] = _TensorDescriptor(v[i], shape, strides, block)
        return op
    new, cls = object.__new__, _TensorDescriptor

    def op(v):
        d = new(cls)
        d.__dict__.update(base=v[i], shape=shape, strides=strides, block_shape=block)
        v[o] = d
    return op


def _seed_view_op(o, dtype):
    def op(v):  # a device seed's view in another dtype than x's, as _seed_args makes it
        v[o] = v[_SEED_RAW].reshape(1).view(dtype)
    return op


class _Plan:
    """A call's steps: ``jit`` launches through the JIT (the first run on a device, launch hooks, the interpreter),
    ``fast[device]`` (once every launch has its CompiledKernel on that current device) relaunches the compiled kernels
    directly; ``fast`` is None where the JIT's path is the only one. ``tail`` is appended to the call's values (slots
    of the temporaries, then the constants); ``out`` reads the outputs off the value list. ``launches``: per launch,
    (its step's position, grid, getter of its arguments, their slots); ``descs``: per TMA descriptor slot, (the
    tensor's slot, shape, strides, block, its step's position)."""
    __slots__ = ("tail", "jit", "fast", "out", "launches", "descs", "keep")

    def run(self, v: list):
        fast = self.fast
        if fast and not _launch_hooks_set():
            drv = _DRIVER.active
            dev = drv.get_current_device()
            ops = fast.get(dev)
            if ops is not None:
                v[_STREAM] = drv.get_current_stream(dev)
                for op in ops:
                    op(v)
                return self.out(v)
        compiled = v[_COMPILED] = [None] * len(self.launches)
        for op in self.jit:
            op(v)
        if fast is not None and self.keep:
            self._go_fast(compiled)
        return self.out(v)

    def _go_fast(self, compiled: list):
        """After a run through the JIT: the steps that relaunch the kernels it ran, for the current device."""
        ops = list(self.jit)
        read = set()  # desc slots that some fast launch still reads
        for (pos, grid, args, slots), c in zip(self.launches, compiled):
            if args is None or getattr(c, "function", None) is None:
                self.fast = None  # the JIT's path for good (the interpreter, a launch that does not fit)
                return
            ops[pos], reads = _fast_launch_op(c, grid, args, slots, self.descs)
            read |= reads
        # a desc step that no launch reads any more (they encode from the tensor itself) is dropped
        dead = {self.descs[s][4] for s in self.descs if s not in read}
        ops = [op for i, op in enumerate(ops) if i not in dead]
        fast = self.fast
        if fast is not None:
            fast.setdefault(_DRIVER.active.get_current_device(), ops)


class _Planner:
    """Records a call's steps: allocations, launches, the torch ops between them, and the outputs (finish)."""

    def __init__(self, x: torch.Tensor, seed_in_mem: bool, p_positive: bool):
        self.device, self.x_dtype, self.seed_in_mem = x.device, x.dtype, bool(seed_in_mem)
        self.n = _N_VALUES
        self.steps: list = []
        self._sums: list = []  # (partials, result) of the sums that finish launches
        self.keep = True
        self._seed_views: dict = {}
        self.scale, self.offset = _Val(_SCALE), _Val(_OFFSET)
        self.drop = (_Val(_THR), p_positive)  # the call's dropout: (threshold, HAS_DROPOUT)

    def value(self, slot: int, t):
        return None if t is None else _Val.of(slot, t)

    def _tmp(self, shape: tuple, dtype) -> _Val:
        val = _Val(self.n, tuple(shape), _contiguous_strides(shape), dtype, self.device)
        self.n += 1
        return val

    def empty(self, shape: tuple, dtype) -> _Val:
        val = self._tmp(shape, dtype)
        self.steps.append(("empty", val.slot, val.shape, dtype, self.device))
        return val

    def zero_(self, val: _Val) -> None:
        self.steps.append(("zero_", val.slot))

    def seed_args(self, like: _Val) -> tuple:
        """_seed_args(seed, like) of the call's seed: the kernels' (seed, seed_ptr, seed_in_mem)."""
        seed, seed_in_mem = _Val(_SEED), _Val(_SEED_IN_MEM)
        if not self.seed_in_mem:
            return seed, like, seed_in_mem
        if like.dtype == self.x_dtype:
            return seed, _Val(_SEED_P), seed_in_mem
        view = self._seed_views.get(like.dtype)
        if view is None:
            view = self._seed_views[like.dtype] = self._tmp((), like.dtype)
            self.steps.append(("seed_view", view.slot, like.dtype))
        return seed, view, seed_in_mem

    def launch(self, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
        """kernel[grid](*args, **kwargs): runtime arguments positionally, constexprs and options by keyword."""
        assert not any(a is out for _, out in self._sums for a in args), "a sum's result is read before its launch"
        self.steps.append(("launch", kernel, tuple(grid), tuple(args), dict(kwargs)))

    def launch_tuned(self, key, tuner, kernel, grid, args: tuple, meta: dict) -> None:
        """kernel[grid(config kwargs)](*args, **meta, **config) with the tuned config for `key`; where there is none
        yet, this call tunes (and its plan is not kept)."""
        cfg = _TUNED.get(key)
        if cfg is None:
            self.keep = False
            self.steps.append(("tune", key, tuner, grid, tuple(args), dict(meta)))
        else:
            self.launch(kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})

    def sum_partials(self, part: _Val, dtype) -> _Val:
        """The sum of the fp32 partials of _partials over the split dim (fixed order: deterministic), in `dtype`.
        The plan's sums run last, all in one launch (_launch_sums, from finish): the result is an output of the
        plan, which no later step reads."""
        if len(part.shape) == 2 and dtype == torch.float32:
            return part  # one split: the partial is the result
        out = self.empty(part.shape[-2:], dtype)
        self._sums.append((part, out))
        return out

    def _launch_sums(self) -> None:
        """One launch of _sum_partials_kernel per two pending sums (a backward has at most two: dA and dB)."""
        block = 1024
        sums, self._sums = self._sums, []
        for i in range(0, len(sums), 2):
            jobs = []
            for part, out in sums[i:i + 2]:
                n = out.shape[0] * out.shape[1]
                jobs.append((part, out, n, part.shape[0] if len(part.shape) == 3 else 1, _cdiv(n, block)))
            if len(jobs) == 1:  # no second sum: none of the programs take it
                jobs.append((jobs[0][0], jobs[0][1], 0, 0, 0))
            (p0, o0, n0, s0, b0), (p1, o1, n1, s1, b1) = jobs
            self.launch(_sum_partials_kernel, (b0 + b1,), (p0, o0, n0, s0, p1, o1, n1, s1, b0),
                        dict(BLOCK=block, num_warps=4))

    def addmm_(self, c: _Val, a: _Val, b: _Val, transpose: bool) -> None:
        """c.addmm_(a, b.t() if transpose else b)."""
        self.steps.append(("addmm", c.slot, a.slot, b.slot, transpose))

    def descriptor(self, t: _Val, shape: tuple, strides: tuple, block: tuple) -> _Val:
        """A TMA descriptor of the call's tensor t (a kernel argument): made on every run, from that run's tensor."""
        val = _Val(self.n)
        self.n += 1
        self.steps.append(("desc", val.slot, t.slot, tuple(shape), tuple(strides), tuple(block)))
        return val

    def finish(self, outputs: tuple) -> _Plan:
        if self._sums:
            self._launch_sums()
        tail = [None] * (self.n - _N_VALUES)
        consts: dict = {}

        def ref(a) -> int:
            if isinstance(a, _Val):
                return a.slot
            assert not isinstance(a, torch.Tensor), "a plan holds no tensors: they are the call's values"
            k = (type(a), a)
            slot = consts.get(k)
            if slot is None:
                slot = consts[k] = _N_VALUES + len(tail)
                tail.append(a)
            return slot

        plan = _Plan()
        launches, jit, descs = [], [], {}
        for step in self.steps:
            kind = step[0]
            if kind == "launch":
                _, kernel, grid, args, kwargs = step
                slots = [ref(a) for a in args]
                names = _constexpr_names(kernel, len(args), kwargs)
                full = None if names is None else slots + [ref(kwargs[n]) for n in names]
                launches.append((len(jit), grid, None if full is None else _getter(full), full))
                jit.append(_jit_launch_op(kernel, grid, _getter(slots), kwargs, len(launches) - 1))
            elif kind == "tune":
                _, key, tuner, grid, args, meta = step
                jit.append(_tune_op(key, tuner, grid, _getter([ref(a) for a in args]), meta))
            elif kind == "empty":
                jit.append(_empty_op(*step[1:]))
            elif kind == "zero_":
                jit.append(_zero_op(step[1]))
            elif kind == "addmm":
                jit.append(_addmm_op(*step[1:]))
            elif kind == "seed_view":
                jit.append(_seed_view_op(*step[1:]))
            elif kind == "desc":  # desc slot -> (tensor slot, shape, strides, block, step position)
                descs[step[1]] = (*step[2:], len(jit))
                jit.append(_desc_op(*step[1:]))
            else:
                raise AssertionError(kind)
        plan.out = _getter([ref(o) for o in outputs])
        plan.tail, plan.jit, plan.launches, plan.descs, plan.keep = tail, jit, launches, descs, self.keep
        plan.fast = {} if _PLAN_FAST else None  # the interpreter's plans launch through the JIT only
        return plan


def _keep_plan(key, plan: _Plan) -> None:
    if plan.keep:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan


def _threshold(p) -> int:
    thr = _THRESHOLDS.get(p)
    if thr is None:
        if len(_THRESHOLDS) >= 1024:
            _THRESHOLDS.clear()
        thr = _THRESHOLDS[p] = keep_threshold(p)
    return thr


# ----------------------------------------------------------------------------------------------------------
# Arguments shared by the passes
# ----------------------------------------------------------------------------------------------------------
def _seed_arg(seed: int) -> int:
    """The 64-bit seed as a signed int64 with the same bits (for kernels that take the seed by value only)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def _seed_args(seed, like) -> tuple:
    """The kernels' (seed, seed_ptr, seed_in_mem) for a seed given as an int (passed by value: the 64 bits as a signed
    int64; ``like``, an input of the launch, fills the unused pointer) or as a 0-d int64 tensor on the device (read by
    the kernels at run time, through the pointer cast back to int64). The seed tensor is passed viewed in like's
    dtype, so that both forms give the kernel the same signature and select the same compiled binary: a CUDA graph
    captured after eager calls compiles nothing."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.reshape(1).view(like.dtype), 1
    return _seed_arg(seed), like, 0


_NO_DROPOUT = (keep_threshold(0.0), False)  # (threshold, HAS_DROPOUT) of the passes that apply no mask


def _partials(pl: _Planner, S: int, rows: int, cols: int) -> tuple:
    """(buffer, its 3 strides) for S fp32 partial sums of a (rows, cols) result that a kernel writes at
    pid * stride0: an (S, rows, cols) tensor, or with S == 1 the (rows, cols) result itself (no sum, no view)."""
    if S == 1:
        return pl.empty((rows, cols), torch.float32), (0, cols, 1)
    return pl.empty((S, rows, cols), torch.float32), (rows * cols, cols, 1)


# ----------------------------------------------------------------------------------------------------------
# The passes, as planner steps. `drop` is (threshold, HAS_DROPOUT): the call's (pl.drop) or none (_NO_DROPOUT).
# ----------------------------------------------------------------------------------------------------------
def _launch_shrink(pl: _Planner, x, lora_A, u, scale, drop, kn: TritonKnobs, split_k: bool):
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
    out = u if splits == 1 else pl.empty((splits, M, R), torch.float32)
    s_us = 0 if splits == 1 else out.stride(0)
    thr, has_dropout = drop
    seed_v, seed_p, seed_in_mem = pl.seed_args(x)
    pl.launch(_shrink_kernel, (m_blocks, splits), (
        x, lora_A, out, M, K, R, k_per_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s_us, out.stride(-2), out.stride(-1),
        scale, thr, seed_v, seed_p, seed_in_mem, pl.offset, calls_per_row(K)),
        dict(HAS_DROPOUT=has_dropout, W_T=False, R_PAD=r_pad, DOT_PREC=_dot_precision(x.dtype, kn),
             RANK_F32=_rank_f32(x, lora_A), BI=BM, BJ=BK, num_warps=warps,
             num_stages=_stages(BM * BK * x.element_size() + BK * r_pad * lora_A.element_size(), kn,
                                _smem_per_block(x.device))))
    return out, splits


def _forward_small_m(pl: _Planner, x, weight, bias, lora_A, lora_B, u, y, scale, drop, kn: TritonKnobs, cs=None):
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = _r_pad(R)
    bm = max(16, _next_pow2(M))
    thr, has_dropout = drop
    # Recomputing u in every program is free at small rank without dropout; otherwise u comes first (see kernel).
    # fp32 adapters on a 16-bit x: u comes from the shrink, which computes it in fp32.
    u_given = has_dropout or r_pad >= 64 or _rank_f32(x, lora_A)
    up, u_splits = u, 1
    if u_given:  # the partial sums are added up by the kernel below
        up, u_splits = _launch_shrink(pl, x, lora_A, u, scale, drop, kn, split_k=True)
        scale = 1.0
    seed_v, seed_p, seed_in_mem = pl.seed_args(x)
    args = (x, weight, lora_A, lora_B, bias if bias is not None else y, cs if cs is not None else y, u, up, y, M, N,
            K, R, u_splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1), M * R, y.stride(0), y.stride(1),
            scale, thr, seed_v, seed_p, seed_in_mem, pl.offset, calls_per_row(K))
    dot_prec = _dot_precision(x.dtype, kn)
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PREC=dot_prec,
                U_GIVEN=u_given, BM=bm, COL_SCALE=cs is not None)
    grid = lambda cfg: (_cdiv(N, cfg["BN"]), _cdiv(M, bm))  # noqa: E731
    elt, a_elt, smem = x.element_size(), lora_A.element_size(), _smem_per_block(x.device)
    if kn.interpret:
        pl.launch(_small_m_kernel, grid({"BN": 32}), args, dict(meta, BN=32, BK=32))
    elif not kn.autotune:
        cfg = _small_m_heuristic(N, bm, elt, a_elt, r_pad, u_given, _num_sms(x.device), smem)
        pl.launch(_small_m_kernel, grid(cfg), args, {**meta, **cfg})
    else:
        key = ("small_m", bm, N, K, bias is not None, has_dropout, r_pad, dot_prec, u_given, x.dtype, weight.dtype,
               lora_A.dtype, lora_B.dtype)
        pl.launch_tuned(key, _tuned_small_m(bm, elt, a_elt, r_pad, u_given, smem), _small_m_kernel, grid, args, meta)


# Which main loop each output pass was planned with: (pass, (M, N), mainloop, why the TMA kernel did not take it or
# None), the latest last; "tma", "cublas" or "triton" (the pointer-based loop). A record for tests and debugging,
# appended when a plan is made (a replay adds nothing).
_GEMM_PATHS: collections.deque = collections.deque(maxlen=64)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def _tma_rows(inner: int, row: int, elem_size: int, aligned: bool) -> bool:
    """Whether TMA can describe a 2-D operand: contiguous rows (inner stride 1), a row stride that is a multiple of 16
    bytes, a 16-byte aligned base."""
    return inner == 1 and (row * elem_size) % 16 == 0 and aligned


def _tma_unsupported(pl: _Planner, a, b_strides, b, c, M, N, K, r_pad, lb_elt: int) -> tuple:
    """(None, b_kn) when _output_gemm_tma_kernel can compute c (M, N) = a (M, K) @ b[k, n] + ..., else (why not,
    None). b_kn: b is stored (K, N) with rows of N (dx: W), not (N, K) (the forward: W). TMA describes a tensor by
    its 16-byte aligned base and row strides, its rows contiguous. Alignment and strides are in the plan key, so the
    answer holds for every call of the plan. The rank-r operands l and lb do not decide it: where TMA cannot describe
    them the kernel reads them through pointers instead (_rank_tma_layout)."""
    if _TensorDescriptor is None:
        return "this triton has no triton.tools.tensor_descriptor.TensorDescriptor", None
    dev = pl.device
    if not _config.TRITON_INTERPRET:
        if dev.type != "cuda":
            return f"tensors on {dev}, not CUDA", None
        if _capability(dev.index if dev.index is not None else torch.cuda.current_device()) < (9, 0):
            return "TMA needs compute capability 9.0 or newer", None
        if _smem_per_block(dev) < _TMA_SMEM:
            return f"{_smem_per_block(dev) // 1024} KB of shared memory per block (its configs take 227)", None
    if a.dtype not in (torch.float16, torch.bfloat16):
        return f"{a.dtype} inputs (the TMA kernel takes 16-bit ones)", None
    if b.dtype != a.dtype:
        return f"W is {b.dtype}, the activations {a.dtype}", None
    if M <= SMALL_M:
        return f"M = {M} <= SMALL_M = {SMALL_M}", None
    if K == 0:
        return "no main loop (K = 0)", None
    if r_pad > _TMA_MAX_R_PAD:
        return f"rank padded to {r_pad} > {_TMA_MAX_R_PAD}: its operands would crowd out the pipeline", None
    if lb_elt == 4 and r_pad > _TMA_MAX_R_PAD_F32:
        return (f"fp32 adapters at a rank padded to {r_pad} > {_TMA_MAX_R_PAD_F32}: the split rank-r operands would "
                "crowd out the pipeline"), None
    es = a.element_size()
    s_bk, s_bn = b_strides
    b_kn = s_bn == 1
    b_row = s_bk if b_kn else s_bn
    rows = (("activations", a.stride(1), a.stride(0), a.aligned), ("W", 1 if b_kn else s_bk, b_row, b.aligned),
            ("output", c.stride(1), c.stride(0), c.aligned))
    for name, inner, row, aligned in rows:
        if inner != 1:
            return f"{name} rows not contiguous", None
        if not _tma_rows(inner, row, es, aligned):
            return f"{name} not 16-byte aligned (address or row stride {row * es} B)", None
    return None, b_kn


def _rank_tma_layout(l, lb_strides, lb, R) -> tuple:
    """How _output_gemm_tma_kernel reads its rank-r operands l (M, R) and lb[r, n]: (True, lb_rn) through TMA
    descriptors (LR_TMA; lb_rn: lb is stored (R, N) with rows of N, dx's A, else (N, R), the forward's B), or
    (False, False) through pointer loads, where TMA cannot describe them: a base not 16-byte aligned, rows not
    contiguous or a row stride not a multiple of 16 bytes (l = u or g is fp32 (M, R): R % 4 != 0; the forward's B
    at 16 bits: R % 8 != 0). The pointer loads are correct but, compiled by triton 3.6, serialise the kernel's wgmma
    (kernels: the comment above _output_gemm_tma_kernel). Alignment and strides are in the plan key, so the answer
    holds for every call of the plan."""
    if R <= 0 or not _tma_rows(l.stride(1), l.stride(0), l.element_size(), l.aligned):
        return False, False
    s_lbr, s_lbn = lb_strides
    es = lb.element_size()
    if _tma_rows(s_lbn, s_lbr, es, lb.aligned):
        return True, True
    if _tma_rows(s_lbr, s_lbn, es, lb.aligned):
        return True, False
    return False, False


def _launch_gemm_tma(pl: _Planner, a, b_strides, b, b_kn: bool, l, lb_strides, lb, bias, c, M, N, K, R, lora_scale,
                     drop, kn: TritonKnobs, cs=None) -> None:
    """The whole output in one launch of _output_gemm_tma_kernel: one program per SM (or per tile, where there are
    fewer), a, b and c (and l and lb, where _rank_tma_layout allows) through descriptors made from each call's
    tensors (planner step "desc"). Fixed configs (configs._tma_config): LORA_KERNELS_TRITON_AUTOTUNE does not
    apply."""
    thr, has_dropout = drop
    r_pad = _r_pad(R)
    sms = _num_sms(pl.device)
    cfg = _tma_config(M, N, a.element_size(), r_pad, lb.element_size(), has_dropout, sms, kn.interpret)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    a_d = pl.descriptor(a, (M, K), (a.stride(0), 1), (BM, BK))
    if b_kn:
        b_d = pl.descriptor(b, (K, N), (b_strides[0], 1), (BK, BN))
    else:
        b_d = pl.descriptor(b, (N, K), (b_strides[1], 1), (BN, BK))
    c_d = pl.descriptor(c, (M, N), (c.stride(0), 1), (BM, BN // cfg["C_SPLIT"]))  # stored in C_SPLIT parts
    lr_tma, lb_rn = _rank_tma_layout(l, lb_strides, lb, R)
    l_src, lb_src = l, lb
    if lr_tma:  # shapes of R, not r_pad: TMA zero-fills past R (and past the M and N edges)
        l_src = pl.descriptor(l, (M, R), (l.stride(0), 1), (BM, r_pad))
        if lb_rn:
            lb_src = pl.descriptor(lb, (R, N), (lb_strides[0], 1), (r_pad, BN))
        else:
            lb_src = pl.descriptor(lb, (N, R), (lb_strides[1], 1), (BN, r_pad))
    seed_v, seed_p, seed_in_mem = pl.seed_args(a)
    args = (a_d, b_d, c_d, l_src, lb_src, bias if bias is not None else c, cs if cs is not None else c, M, N, K, R,
            l.stride(0), l.stride(1), lb_strides[0], lb_strides[1],
            lora_scale, thr, seed_v, seed_p, seed_in_mem, pl.offset, calls_per_row(N))
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, R_PAD=r_pad,
                DOT_PREC=_dot_precision(a.dtype, kn), B_KN=b_kn, LR_TMA=lr_tma, LB_RN=lb_rn, NUM_SMS=sms,
                COL_SCALE=cs is not None, **cfg)
    pl.launch(_output_gemm_tma_kernel, (min(sms, _cdiv(M, BM) * _cdiv(N, BN)),), args, meta)


def _launch_gemm(pl: _Planner, a, b_strides, b, b_mat, l, lb_strides, lb, bias, c, N, K, R, lora_scale, drop,
                 kn: TritonKnobs, name: str, cs=None):
    """c (M, N) = a (M, K) @ b[k, n] + [keep] * lora_scale * l (M, R) @ lb[r, n] + bias, or with a column scale cs
    (N,) fp32 (forward_scaled, no dropout) c = cs ⊙ (a @ b + l @ lb) + bias: in the epilogue of the TMA and Triton
    main loops; after cuBLAS (which adds its product unscaled) by one pass over c (_scale_bias_kernel, the bias
    there too).

    With LORA_KERNELS_TRITON_MAINLOOP=tma, where the TMA kernel can take the call (_tma_unsupported), it computes
    all of it in one launch; with auto (the default, off the interpreter) the same up to a padded rank of
    _TMA_AUTO_MAX_R_PAD and without the dropout mask (dx at p > 0 keeps cuBLAS). Otherwise: with the cuBLAS main
    loop, the kernel runs with no main K-steps (it writes the rank-r term and the bias) and cuBLAS then accumulates
    a @ b_mat into c with beta = 1 (c.addmm_), reading c in its epilogue (``b_mat`` is (tensor, transpose): b_mat is
    that tensor, or its transpose); with the Triton one, _output_gemm_kernel runs the main loop too.
    """
    M = a.shape[0]
    r_pad = _r_pad(R)
    thr, has_dropout = drop
    why = "LORA_KERNELS_TRITON_MAINLOOP is not tma or auto"
    if kn.tma:
        why, b_kn = _tma_unsupported(pl, a, b_strides, b, c, M, N, K, r_pad, lb.element_size())
        if why is None and kn.tma_auto:
            if r_pad > _TMA_AUTO_MAX_R_PAD:
                why = (f"auto: rank padded to {r_pad} > {_TMA_AUTO_MAX_R_PAD}, where the cuBLAS main loop "
                       "measured faster")
            elif has_dropout:
                why = "auto: the dropout mask in the epilogue (dx), where the cuBLAS main loop measured faster"
        if why is None:
            _GEMM_PATHS.append((name, (M, N), "tma", None))
            _launch_gemm_tma(pl, a, b_strides, b, b_kn, l, lb_strides, lb, bias, c, M, N, K, R, lora_scale, drop, kn,
                             cs)
            return
    cublas = kn.cublas  # (off under the interpreter; the backend gets CUDA tensors otherwise)
    _GEMM_PATHS.append((name, (M, N), "cublas" if cublas else "triton", why))
    bias_after = None  # cuBLAS with a column scale: the bias comes with the scale, after the GEMM
    if cublas:
        K = 0
        if cs is not None:
            bias, bias_after = None, bias
    has_bias = bias is not None
    cs_in = cs is not None and not cublas
    m_bucket = min(_next_pow2(M), 4096)
    seed_v, seed_p, seed_in_mem = pl.seed_args(a)
    args = (a, b, l, lb, bias if has_bias else c, cs if cs_in else c, c, M, N, K, R,
            a.stride(0), a.stride(1), b_strides[0], b_strides[1], l.stride(0), l.stride(1),
            lb_strides[0], lb_strides[1], c.stride(0), c.stride(1),
            lora_scale, thr, seed_v, seed_p, seed_in_mem, pl.offset, calls_per_row(N), m_bucket)
    dot_prec = _dot_precision(a.dtype, kn)
    # the rank-r term of fp32 adapters split where this kernel's output is the pass's only rounding: not under
    # cuBLAS, which adds its product to the term already written in x's dtype (kernels._rank_expand)
    meta = dict(HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PREC=dot_prec, RANK_SPLIT=not cublas,
                COL_SCALE=cs_in)
    grid = lambda cfg: (_cdiv(M, cfg["BM"]) * _cdiv(N, cfg["BN"]),)  # noqa: E731
    if kn.interpret:
        cfg = dict(BM=16, BN=32, BK=32, GROUP_M=4)
        pl.launch(_output_gemm_kernel, grid(cfg), args, {**meta, **cfg})
    elif cublas:
        # No main K-steps: a memory-bound write of c (plus the rank-r dot and, with dropout, the mask). One fixed
        # tile serves every shape near the memory bandwidth; tuning main-loop tiles for it would only cost compile
        # time on each new shape.
        cfg = _rank_term_config(r_pad)
        pl.launch(_output_gemm_kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})
    elif not kn.autotune:  # first config, no tuning (GPU tests)
        cfg = _gemm_configs(M <= 64, a.element_size(), r_pad, _smem_per_block(pl.device))[0]
        pl.launch(_output_gemm_kernel, grid(cfg.kwargs), args, {**meta, **cfg.all_kwargs()})
    else:
        key = ("gemm", M <= 64, m_bucket, N, K, has_bias, has_dropout, r_pad, dot_prec, a.dtype, b.dtype, l.dtype,
               lb.dtype)
        pl.launch_tuned(key, _tuned_gemm(M <= 64, a.element_size(), r_pad, _smem_per_block(pl.device)),
                        _output_gemm_kernel, grid, args, meta)
    if cublas:
        pl.addmm_(c, a, *b_mat)
        if cs is not None:  # c = cs ⊙ c + bias, in place
            bm, bn = _ELEMENTWISE_TILES
            pl.launch(_scale_bias_kernel, (_cdiv(M, bm), _cdiv(N, bn)),
                      (c, cs, bias_after if bias_after is not None else cs, c, M, N, c.stride(0), c.stride(0)),
                      dict(HAS_BIAS=bias_after is not None, BM=bm, BN=bn))


def _launch_shrink_t(pl: _Planner, w, rk, out_dtype, out_t, scale, drop, r_pad, prec, rank_f32, kn: TritonKnobs):
    """The shrink of w^T: scale * ([keep *] w)^T @ rk (C, R), for w (M, C) and rk (M, R), the dropout mask being
    w's. dB from w = dy, rk = u; dA^T from w = x, rk = g, written as dA (R, C) when `out_t`. M is split into chunks
    that fill the GPU; each chunk writes fp32 partials, summed in a fixed order."""
    M, C = w.shape
    R = rk.shape[1]
    BM, BN, warps = _helper_tiles(M, r_pad, kn)
    n_blocks = _cdiv(C, BN)
    S, per = _splits(M, BM, n_blocks, w.device)
    if out_t:
        part, (s_os, s_or, s_oi) = _partials(pl, S, R, C)
    else:
        part, (s_os, s_oi, s_or) = _partials(pl, S, C, R)
    thr, has_dropout = drop
    seed_v, seed_p, seed_in_mem = pl.seed_args(w)
    pl.launch(_shrink_kernel, (n_blocks, S), (
        w, rk, part, C, M, R, per,
        w.stride(1), w.stride(0), rk.stride(1), rk.stride(0), s_os, s_oi, s_or,
        scale, thr, seed_v, seed_p, seed_in_mem, pl.offset, calls_per_row(C)),
        dict(HAS_DROPOUT=has_dropout, W_T=True, R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BI=BN, BJ=BM,
             num_warps=warps, num_stages=_stages(BM * BN * w.element_size() + BM * r_pad * 4, kn,
                                                 _smem_per_block(w.device))))
    return pl.sum_partials(part, out_dtype)


def _plan_forward(x, weight, bias, lora_A, lora_B, p_positive: bool, seed_in_mem, kn: TritonKnobs,
                  col_scale=None) -> _Plan:
    pl = _Planner(x, seed_in_mem, p_positive)
    xv, wv, bv, av, bbv = (pl.value(_X, x), pl.value(_W, weight), pl.value(_BIAS, bias), pl.value(_A, lora_A),
                           pl.value(_B, lora_B))
    csv = pl.value(_CS, col_scale)
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    u = pl.empty((M, R), torch.float32)
    y = pl.empty((M, N), x.dtype)
    if M <= SMALL_M and K > 0 and N > 0:
        _forward_small_m(pl, xv, wv, bv, av, bbv, u, y, pl.scale, pl.drop, kn, csv)
    else:
        if K == 0:
            pl.zero_(u)
        else:
            _launch_shrink(pl, xv, av, u, pl.scale, pl.drop, kn, split_k=False)  # 1 split
        if N > 0:
            # y = x @ W^T + u @ B^T + b: b operand W^T[k, n] = W[n, k]; lb operand B^T[r, n] = B[n, r]
            _launch_gemm(pl, xv, (wv.stride(1), wv.stride(0)), wv, (wv, True), u, (bbv.stride(1), bbv.stride(0)),
                         bbv, bv, y, N, K, R, 1.0, _NO_DROPOUT, kn, "y", csv)
    return pl.finish((y, u))


def _plan_backward(dy, x, weight, lora_A, lora_B, u, p_positive: bool, seed_in_mem, need_dx, need_dA, need_dB,
                   kn: TritonKnobs, dx_from=None) -> _Plan:
    pl = _Planner(x, seed_in_mem, p_positive)
    dyv, xv, wv, av, bbv, uv = (pl.value(_DY, dy), pl.value(_X, x), pl.value(_W, weight), pl.value(_A, lora_A),
                                pl.value(_B, lora_B), pl.value(_U, u))
    dxfv = dyv if dx_from is None else pl.value(_DXF, dx_from)  # dx's frozen product: dxf @ W
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    dx = pl.empty((M, K), x.dtype) if need_dx else None
    dA = dB = None
    r_pad = _r_pad(R)
    prec = _dot_precision(x.dtype, kn)
    rank_f32 = _rank_f32(x, lora_A, lora_B)

    g = None
    if need_dx or need_dA:
        BM, BN, warps = _helper_tiles(M, r_pad, kn)
        g = pl.empty((M, R), torch.float32)
        smem = _smem_per_block(dy.device)

        def stage_bytes(bm, bn, fuse):  # a dy tile (twice with dB: its transpose), a B chunk, and dB's u tile
            return (bm * bn * dy.element_size() * (2 if fuse else 1) + bn * r_pad * lora_B.element_size()
                    + (bm * r_pad * 4 if fuse else 0))

        # fuse dB into the g pass when the per-M-block partial buffer is small next to dy (2r/BM of it)
        fuse_db = need_dB and _cdiv(M, BM) * N * R * 4 <= _FUSE_DB_PARTIAL_RATIO * M * N * dy.element_size()
        # on a device with smaller blocks (99 KB on sm_86 / sm_89) a wide rank's tiles are narrowed until one stage
        # fits: the columns first, then the rows
        while stage_bytes(BM, BN, fuse_db) > _max_smem(smem) and max(BM, BN) > 16:
            BN, BM = (BN // 2, BM) if BN >= BM else (BN, BM // 2)
        m_blocks = _cdiv(M, BM)
        dbp, dbp_s = _partials(pl, m_blocks, N, R) if fuse_db else (g, (0, 0, 0))
        pl.launch(_dy_pass_kernel, (m_blocks,), (
            dyv, bbv, uv, g, dbp, M, N, R,
            dyv.stride(0), dyv.stride(1), bbv.stride(0), bbv.stride(1), uv.stride(0), uv.stride(1),
            g.stride(0), g.stride(1), *dbp_s),
            dict(NEED_DB=fuse_db, R_PAD=r_pad, DOT_PREC=prec, RANK_F32=rank_f32, BM=BM, BN=BN, num_warps=warps,
                 num_stages=_stages(stage_bytes(BM, BN, fuse_db), kn, smem)))
        if fuse_db:
            dB = pl.sum_partials(dbp, lora_B.dtype)
    if need_dB and dB is None:  # dB = dy^T u: no mask (p = 0), no scale
        dB = _launch_shrink_t(pl, dyv, uv, lora_B.dtype, False, 1.0, _NO_DROPOUT, r_pad, prec, rank_f32, kn)
    if need_dA:  # dA = s/q * g^T (keep * x), the transpose of s/q * (keep * x)^T g
        dA = _launch_shrink_t(pl, xv, g, lora_A.dtype, True, pl.scale, pl.drop, r_pad, prec, rank_f32, kn)
    if need_dx:
        # dx = dy @ W + keep * s/q * (g @ A): b operand W[n, k] (rows = reduction dim n); lb operand A[r, k]
        # (dx_from in dy's place in the first product: backward_dx_from)
        _launch_gemm(pl, dxfv, (wv.stride(0), wv.stride(1)), wv, (wv, False), g, (av.stride(0), av.stride(1)), av,
                     None, dx, K, N, R, pl.scale, pl.drop, kn, "dx")
    return pl.finish((dx, dA, dB))


# ----------------------------------------------------------------------------------------------------------
# The backend contract (lora_kernels/backends/__init__.py)
# ----------------------------------------------------------------------------------------------------------
def forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, offset):
    return _forward(x, weight, bias, lora_A, lora_B, None, scaling, p, seed, offset)


def forward_scaled(x, weight, bias, lora_A, lora_B, col_scale, scaling, p, seed, offset):
    """(y, u) of forward with a per-column scale c (N,) float32: y = c ⊙ (x Wᵀ + s·u Bᵀ) + bias (DoRA's column
    scale), applied in the output pass's epilogue and y rounded once (the small-M, TMA and Triton main loops); after
    the cuBLAS main loop, in one pass over y."""
    return _forward(x, weight, bias, lora_A, lora_B, col_scale.contiguous(), scaling, p, seed, offset)


def _forward(x, weight, bias, lora_A, lora_B, col_scale, scaling, p, seed, offset):
    other = _other_device((x,))
    if other is not None:  # run on x's device (_other_device)
        with torch.cuda.device(other):
            return _forward(x, weight, bias, lora_A, lora_B, col_scale, scaling, p, seed, offset)
    M = x.shape[0]
    if M == 0:
        return (torch.empty((0, weight.shape[0]), dtype=x.dtype, device=x.device),
                torch.empty((0, lora_A.shape[0]), dtype=torch.float32, device=x.device))
    kn = _config.triton_knobs()
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)
    key = (kn, p > 0.0, seed_in_mem, seed_in_mem and seed_p.data_ptr() % 16, x.get_device(), SMALL_M,
           id(_TUNED), id(_small_m_kernel), id(_shrink_kernel), id(_output_gemm_kernel), id(_output_gemm_tma_kernel),
           x.shape, x.stride(), x.dtype, x.data_ptr() % 16,
           weight.shape, weight.stride(), weight.dtype, weight.data_ptr() % 16,
           lora_A.shape, lora_A.stride(), lora_A.dtype, lora_A.data_ptr() % 16,
           lora_B.shape, lora_B.stride(), lora_B.dtype, lora_B.data_ptr() % 16,
           None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.data_ptr() % 16),
           None if col_scale is None else (col_scale.shape, col_scale.stride(), col_scale.dtype))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan_forward(x, weight, bias, lora_A, lora_B, p > 0.0, seed_in_mem, kn, col_scale)
        _keep_plan(key, plan)
    v = [x, weight, bias, lora_A, lora_B, None, None, float(scaling) / (1.0 - float(p)), _threshold(p), seed_v,
         seed_p, seed_in_mem, int(offset), None, seed, None, None, col_scale]
    v += plan.tail
    return plan.run(v)


def backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    return _backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB, None)


def backward_dx_from(dy, x, weight, lora_A, lora_B, u, dx_from, scaling, p, seed, offset, need_dx, need_dA, need_dB):
    """backward with dx's frozen product from ``dx_from`` (M, N) instead of dy: dx = dx_from W + s·(dy B) A (masked
    with dropout), dA and dB from dy (DoRA at p = 0: dx_from = g ⊙ dy with B = g ⊙ B, every grad in one call)."""
    return _backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB, dx_from)


def _backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB, dx_from):
    other = _other_device((x,))
    if other is not None:  # run on x's device (_other_device)
        with torch.cuda.device(other):
            return _backward(dy, x, weight, lora_A, lora_B, u, scaling, p, seed, offset, need_dx, need_dA, need_dB,
                             dx_from)
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0 or K == 0:  # nothing to launch
        R = lora_A.shape[0]
        dev = x.device
        dx = torch.zeros((M, K), dtype=x.dtype, device=dev) if need_dx else None
        dA = torch.zeros((R, K), dtype=lora_A.dtype, device=dev) if need_dA else None
        dB = torch.zeros((N, R), dtype=lora_B.dtype, device=dev) if need_dB else None
        return dx, dA, dB
    kn = _config.triton_knobs()
    seed_v, seed_p, seed_in_mem = _seed_args(seed, x)
    key = (kn, p > 0.0, seed_in_mem, seed_in_mem and seed_p.data_ptr() % 16, x.get_device(),
           _FUSE_DB_PARTIAL_RATIO, SMALL_M, id(_TUNED), id(_dy_pass_kernel), id(_shrink_kernel),
           id(_output_gemm_kernel), id(_output_gemm_tma_kernel), id(_sum_partials_kernel), need_dx, need_dA, need_dB,
           dy.shape, dy.stride(), dy.dtype, dy.data_ptr() % 16,
           x.shape, x.stride(), x.dtype, x.data_ptr() % 16,
           weight.shape, weight.stride(), weight.dtype, weight.data_ptr() % 16,
           lora_A.shape, lora_A.stride(), lora_A.dtype, lora_A.data_ptr() % 16,
           lora_B.shape, lora_B.stride(), lora_B.dtype, lora_B.data_ptr() % 16,
           u.shape, u.stride(), u.dtype, u.data_ptr() % 16,
           None if dx_from is None else (dx_from.shape, dx_from.stride(), dx_from.dtype, dx_from.data_ptr() % 16))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan_backward(dy, x, weight, lora_A, lora_B, u, p > 0.0, seed_in_mem, need_dx, need_dA, need_dB, kn,
                              dx_from)
        _keep_plan(key, plan)
    v = [x, weight, None, lora_A, lora_B, dy, u, float(scaling) / (1.0 - float(p)), _threshold(p), seed_v, seed_p,
         seed_in_mem, int(offset), None, seed, None, dx_from, None]
    v += plan.tail
    return plan.run(v)
