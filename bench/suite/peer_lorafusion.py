"""LoRAFusion (CentML/lorafusion, commit c48d7fd) as a benchmark peer: the loader and the timed callables of the
"lorafusion" provider in bench/suite/providers.py.

LoRAFusion's code is not part of this repository. ``bench/tools/get_lorafusion.sh SRC`` copies the package files that
``lorafusion.ops.lora_v1`` needs into a git-ignored folder, by default ``<repo>/.peers/lorafusion`` (the one with
``lorafusion/ops/lora_v1.py`` inside); the environment variable ``LORAFUSION_DIR`` names another one.

What the loader does, none of it by editing LoRAFusion's files:

* ``loguru`` (LoRAFusion logs through it) is stood in by a small module over ``logging`` while LoRAFusion is
  imported, when the real one is not installed. ``lorafusion.utils.benchmark`` (its own benchmark harness, used
  only in the kernels' ``__main__`` blocks) is stood in when one of its imports (tabulate, tqdm, ...) is missing.
* Without a GPU (CPU tests), ``fused_dropout_matmul.py``'s import-time ``get_device_short_name()`` call (for a
  heuristic of a kernel that lora_v1 does not use by default) gets a placeholder name during the import.
* Its TMA modules (``tma_utils.py``, ``fused_lora_xw_sb_tma.py``, ``fused_lora_dyw_dsa_tma.py``) use
  ``tl._experimental_descriptor_load/_store`` and ``tl.nv_tma_desc_type``, which Triton 3.4 removed: they fail at
  import. Inert placeholder modules are registered in their place, with ``HAS_TMA_DESC = False``, so that
  ``lora_v1`` selects its non-TMA kernels ``fused_lora_xw_sb`` (forward) and ``fused_lora_dyw_dsa`` (dx), which
  is also LoRAFusion's choice on any GPU without TMA descriptors. Done on every Triton version, so that one
  configuration is measured.
* At dropout_p == 0 its forward saves no dropout mask and its backward then reads ``dropout_mask.shape`` of None.
  The dx kernel entry in ``lora_v1`` is wrapped to pass a zero-stride dummy mask of the right shape instead; with
  p == 0 the kernel is compiled with ENABLE_DROPOUT false and never reads it.
* Its config table (``HARDWARE_CONFIGS``, keyed by the lower-cased device name) knows only 'h100-80gb-hbm3' for
  Hopper: a Hopper GPU missing from the table (an H200: 'h200') gets a copy of that entry.
* Its tuned H100 forward config overflows shared memory at r = 64 (245,760 > 232,448 bytes on Hopper). For each
  case the three tuned kernel configs are tried at the case's (K, N, r, p) on a few rows; one that Triton refuses
  with OutOfResources gets num_stages lowered by one until it compiles. The configs found are set on the device's
  ``HardwareConfig`` object at the start of every call (a few attribute stores), so that LoRAFusion's own lookup
  (``get_lora_kernel_config``) picks them up and its call path is otherwise unchanged.

Conventions (those of bench/suite/providers.py): x is passed as a (1, M, K) view (``fused_linear_lora`` needs a 3-D x;
the view is made once per input set, as a leaf sharing x's storage), W (N, K), no bias, A (r, K) and B (N, r) in x's
dtype (LoRAFusion checks that x, W, s and B have one dtype), alpha = the PEFT scaling, a fixed dropout seed.
``fwd`` runs under torch.no_grad; ``fwd_bwd`` returns torch.autograd.grad(y, (x, A, B), dy).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys
import types
import warnings

import torch

COMMIT = "c48d7fd"
ENV_DIR = "LORAFUSION_DIR"
HOPPER_KEY = "h100-80gb-hbm3"   # the one Hopper entry of LoRAFusion's HARDWARE_CONFIGS
SEED = 1234                     # the fixed dropout seed passed to fused_linear_lora
KERNELS = ("fused_lora_xw_sb", "fused_lora_dyw_dsa", "fused_lora_dys_dyb")  # the non-TMA single-LoRA kernels
FIT_ROWS = 128                  # rows of the trial launches that find a config that fits in shared memory
_TMA_MODULES = ("tma_utils", "fused_lora_xw_sb_tma", "fused_lora_dyw_dsa_tma")


class LoRAFusionUnavailable(RuntimeError):
    """LoRAFusion cannot run here (source not found, no GPU, unknown GPU)."""


def default_dir() -> pathlib.Path:
    """$LORAFUSION_DIR, else the nearest <ancestor>/.peers/lorafusion of this file, else <repo>/.peers/lorafusion."""
    env = os.environ.get(ENV_DIR)
    if env:
        return pathlib.Path(env).expanduser().resolve()
    here = pathlib.Path(__file__).resolve().parent
    for d in (here, *here.parents):
        if (d / ".peers" / "lorafusion").is_dir():
            return d / ".peers" / "lorafusion"
    for d in (here, *here.parents):
        if (d / ".git").exists() or (d / "setup.py").exists():
            return d / ".peers" / "lorafusion"
    return here.parent / ".peers" / "lorafusion"


# ---------------------------------------------------------------------------------------------------- stand-ins
class _Logger:
    """Stand-in for loguru's ``logger``: the calls LoRAFusion makes, onto the standard ``logging`` module."""

    def __init__(self):
        self._log = logging.getLogger("lorafusion")

    def debug(self, msg, *args, **kwargs):
        self._log.debug(str(msg))

    def info(self, msg, *args, **kwargs):
        self._log.info(str(msg))

    success = info

    def warning(self, msg, *args, **kwargs):
        self._log.warning(str(msg))

    def error(self, msg, *args, **kwargs):
        self._log.error(str(msg))

    def critical(self, msg, *args, **kwargs):
        self._log.critical(str(msg))

    def exception(self, msg, *args, **kwargs):
        self._log.exception(str(msg))

    def opt(self, *args, **kwargs):
        return self

    def remove(self, *args, **kwargs):
        pass

    def add(self, *args, **kwargs):
        return 0


def _module(name: str, doc: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__dict__.update(attrs)
    mod.__file__ = __file__  # where it came from, for tracebacks
    return mod


def _tma_disabled(*args, **kwargs):
    raise RuntimeError("LoRAFusion's TMA kernels are replaced by placeholders in this benchmark (they need "
                       "tl._experimental_descriptor_load/_store, which Triton 3.4 removed)")


def _harness_disabled(*args, **kwargs):
    raise RuntimeError("lorafusion.utils.benchmark is a stand-in here (one of its imports is not installed)")


def _placeholder_tma_modules() -> dict:
    base = "lorafusion.ops.triton_ops."
    doc = "Inert placeholder for LoRAFusion's TMA module (registered by bench/suite/peer_lorafusion.py)."
    return {
        base + "tma_utils": _module(base + "tma_utils", doc, HAS_TMA_DESC=False, TmaAutoTuneHelper=None),
        base + "fused_lora_xw_sb_tma": _module(base + "fused_lora_xw_sb_tma", doc,
                                               fused_lora_xw_sb_tma=_tma_disabled),
        base + "fused_lora_dyw_dsa_tma": _module(base + "fused_lora_dyw_dsa_tma", doc,
                                                 fused_lora_dyw_dsa_tma=_tma_disabled),
    }


# ------------------------------------------------------------------------------------------------------- loader
@dataclasses.dataclass
class LoRAFusion:
    """The imported LoRAFusion modules."""

    root: pathlib.Path
    lora_v1: types.ModuleType
    config: types.ModuleType            # lorafusion.ops.triton_ops.config
    kernels: dict                       # kernel name -> its module (fused_lora_xw_sb, ...)
    standins: list                      # what was stood in, for the note
    dummy_masks: dict = dataclasses.field(default_factory=dict)
    tuned: dict = dataclasses.field(default_factory=dict)  # device name -> (tuned configs by kernel, note)

    def dummy_mask(self, m: int, k: int, device) -> torch.Tensor:
        """A (m, k) bool tensor with strides (0, 0): one byte of storage, cached per shape."""
        key = (str(device), m, k)
        if key not in self.dummy_masks:
            self.dummy_masks[key] = torch.zeros((), dtype=torch.bool, device=device).expand(m, k)
        return self.dummy_masks[key]


_LOADED: dict = {}  # resolved root -> LoRAFusion


def load(root=None) -> LoRAFusion:
    """Import LoRAFusion's ``lora_v1`` from ``root`` (default: ``default_dir()``) with the stand-ins, the TMA
    placeholders and the dummy-mask wrapper in place. Needs no GPU. Raises LoRAFusionUnavailable when the source
    is not there."""
    root = pathlib.Path(root).expanduser().resolve() if root else default_dir()
    if root in _LOADED:
        return _LOADED[root]
    if not (root / "lorafusion" / "ops" / "lora_v1.py").is_file():
        raise LoRAFusionUnavailable(
            f"LoRAFusion source not found: no {root}/lorafusion/ops/lora_v1.py (run bench/tools/get_lorafusion.sh on a "
            f"checkout or git archive of CentML/lorafusion {COMMIT}, or set {ENV_DIR})")
    loaded = sys.modules.get("lorafusion")
    if loaded is not None:
        where = pathlib.Path(getattr(loaded, "__file__", "") or "").resolve()
        if root not in where.parents:
            raise LoRAFusionUnavailable(f"another lorafusion is already imported (from {where}), not {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    standins: list[str] = []
    added: list[str] = []  # top-level stand-ins to remove again once LoRAFusion holds its references
    try:
        try:
            import loguru  # noqa: F401
        except ImportError:
            sys.modules["loguru"] = _module("loguru", "Stand-in for loguru (bench/suite/peer_lorafusion.py).",
                                            logger=_Logger())
            added.append("loguru")
            standins.append("loguru")
        import lorafusion.ops.triton_ops  # noqa: F401  (the real package, before its placeholder submodules)

        for name, mod in _placeholder_tma_modules().items():
            sys.modules[name] = mod
            setattr(sys.modules["lorafusion.ops.triton_ops"], name.rsplit(".", 1)[1], mod)
        try:
            import lorafusion.utils.benchmark  # noqa: F401
        except ImportError as e:
            if (e.name or "").startswith("lorafusion"):
                raise
            import lorafusion.utils as lf_utils

            name = "lorafusion.utils.benchmark"
            sys.modules[name] = lf_utils.benchmark = _module(
                name, f"Stand-in for LoRAFusion's benchmark harness ({e.name} is not installed).",
                benchmark=_harness_disabled, set_warmup_and_number=_harness_disabled)
            standins.append(f"lorafusion.utils.benchmark ({e.name} missing)")
        import lorafusion.utils.common as common

        device_short_name = common.get_device_short_name
        if not torch.cuda.is_available():
            # fused_dropout_matmul.py asks for the GPU's name at import (for a heuristic of a kernel lora_v1 does
            # not use by default): without a GPU, a name for the import only.
            common.get_device_short_name = lambda: "no-cuda"
        try:
            with warnings.catch_warnings():
                # "LORAFUSION_FORWARD_USE_TMA is enabled but it is not supported by the hardware": the placeholders
                warnings.filterwarnings("ignore", message="LORAFUSION_", category=UserWarning)
                import lorafusion.ops.lora_v1 as lora_v1
                import lorafusion.ops.triton_ops.config as config
                import lorafusion.ops.triton_ops.fused_lora_dys_dyb as dys_dyb
                import lorafusion.ops.triton_ops.fused_lora_dyw_dsa as dyw_dsa
                import lorafusion.ops.triton_ops.fused_lora_xw_sb as xw_sb
        finally:
            for mod in (common, sys.modules.get("lorafusion.ops.triton_ops.config"),
                        sys.modules.get("lorafusion.ops.triton_ops.fused_dropout_matmul")):
                if mod is not None:
                    mod.get_device_short_name = device_short_name
    except ImportError as e:
        raise LoRAFusionUnavailable(f"importing LoRAFusion from {root} failed: {type(e).__name__}: {e}") from e
    finally:
        for name in added:
            sys.modules.pop(name, None)

    if lora_v1.fused_lora_xw_sb_func is not xw_sb.fused_lora_xw_sb:
        raise LoRAFusionUnavailable("lora_v1 did not select the non-TMA forward kernel fused_lora_xw_sb")
    lf = LoRAFusion(root, lora_v1, config, {"fused_lora_xw_sb": xw_sb, "fused_lora_dyw_dsa": dyw_dsa,
                                            "fused_lora_dys_dyb": dys_dyb}, standins)
    dx_kernel = lora_v1.fused_lora_dyw_dsa_func
    if dx_kernel is not dyw_dsa.fused_lora_dyw_dsa:
        raise LoRAFusionUnavailable("lora_v1 did not select the non-TMA dx kernel fused_lora_dyw_dsa")

    def fused_lora_dyw_dsa_with_mask(dy, w, ds, a, dropout_p, dropout_mask=None, **kwargs):
        """lora_v1's dx kernel entry; a zero-stride dummy mask where LoRAFusion passes None (p == 0)."""
        if dropout_mask is None:
            dropout_mask = lf.dummy_mask(dy.shape[0], w.shape[1], dy.device)
        return dx_kernel(dy=dy, w=w, ds=ds, a=a, dropout_p=dropout_p, dropout_mask=dropout_mask, **kwargs)

    lora_v1.fused_lora_dyw_dsa_func = fused_lora_dyw_dsa_with_mask
    _LOADED[root] = lf
    return lf


# ----------------------------------------------------------------------------------------------- GPU configs
def _out_of_resources(e: Exception) -> bool:
    return type(e).__name__ == "OutOfResources" or "out of resource" in str(e).lower()


def hardware_config(lf: LoRAFusion):
    """The current GPU's entry of LoRAFusion's HARDWARE_CONFIGS, replaced by a copy of itself (the per-case
    configs are set on the copy, the tuned entry stays as it is): (entry, tuned configs by kernel, note)."""
    name = lf.config.get_device_short_name()  # what get_lora_kernel_config() looks up
    table = lf.config.HARDWARE_CONFIGS
    if name not in lf.tuned:
        if name in table:
            src, note = table[name], f"config {name}"
        elif torch.cuda.get_device_capability()[0] == 9 and HOPPER_KEY in table:
            src, note = table[HOPPER_KEY], f"config {HOPPER_KEY} for {name}"
        else:
            raise LoRAFusionUnavailable(f"LoRAFusion has no tuned config for GPU {name!r} (it knows "
                                        f"{sorted(table)})")
        lf.tuned[name] = ({k: getattr(src, k) for k in KERNELS}, note)
        table[name] = dataclasses.replace(src)
    tuned, note = lf.tuned[name]
    return table[name], tuned, note


def fit_configs(lf: LoRAFusion, tuned: dict, W, A, B, scaling: float, p: float) -> tuple[dict, list]:
    """The tuned config of each kernel, num_stages lowered while Triton refuses it for shared memory at this
    (K, N, r, p); trial launches of FIT_ROWS rows (which also compile the kernels the case will use)."""
    N, K = W.shape
    r = A.shape[0]
    dev, dt = W.device, W.dtype
    m = FIT_ROWS
    x, dy = torch.zeros(m, K, device=dev, dtype=dt), torch.zeros(m, N, device=dev, dtype=dt)
    s = torch.zeros(m, r, device=dev, dtype=dt)
    mask = torch.ones(m, K, device=dev, dtype=torch.bool) if p > 0 else lf.dummy_mask(m, K, dev)
    k = lf.kernels
    trials = {
        "fused_lora_xw_sb": lambda c: k["fused_lora_xw_sb"].fused_lora_xw_sb(
            x=x, w=W, s=s, b=B, alpha=scaling, bias=None, config=c),
        "fused_lora_dyw_dsa": lambda c: k["fused_lora_dyw_dsa"].fused_lora_dyw_dsa(
            dy=dy, w=W, ds=s, a=A, dropout_p=p, dropout_mask=mask, config=c),
        "fused_lora_dys_dyb": lambda c: k["fused_lora_dys_dyb"].fused_lora_dys_dyb(
            dy=dy, b=B, s=s, alpha=scaling, config=c),
    }
    fitted, changes = {}, []
    for name in KERNELS:
        cfg = tuned[name]
        while True:
            try:
                trials[name](cfg)
                break
            except Exception as e:
                if not _out_of_resources(e) or cfg.num_stages <= 1:
                    raise
                cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        if cfg != tuned[name]:
            changes.append(f"{name} num_stages {tuned[name].num_stages}->{cfg.num_stages} (shared memory)")
        fitted[name] = cfg
    if W.is_cuda:
        torch.cuda.synchronize()
    return fitted, changes


# -------------------------------------------------------------------------------------------------- provider
class Prepared:
    """LoRAFusion ready for one case (K, N, r, p): ``callables(x, W, A, B, dy)`` gives its fwd / fwd_bwd."""

    def __init__(self, lf: LoRAFusion, hw, configs: dict, scaling: float, p: float, seed: int, note: str):
        self.lf, self.hw, self.configs = lf, hw, configs
        self.scaling, self.p, self.seed, self.note = float(scaling), float(p), int(seed), note

    def install(self) -> None:
        """Set this case's kernel configs on LoRAFusion's HardwareConfig object (read by its kernels per call)."""
        if self.hw is not None:
            for name, cfg in self.configs.items():
                setattr(self.hw, name, cfg)

    def callables(self, x, W, A, B, dy, bias=None):
        """(fwd, fwd_bwd, x3): x3 is the (1, M, K) leaf sharing x's storage whose gradient fwd_bwd returns."""
        M, K = x.shape
        x3 = x.detach().view(1, M, K).requires_grad_(x.requires_grad)
        dy3 = dy.view(1, M, dy.shape[-1])
        f = self.lf.lora_v1.fused_linear_lora
        s, p, seed, install = self.scaling, self.p, self.seed, self.install

        def call():
            install()
            return f(x3, W, A, B, s, seed=seed, dropout_p=p, linear_bias=bias)

        def fwd():
            with torch.no_grad():
                return call()

        def fwd_bwd():
            return torch.autograd.grad(call(), (x3, A, B), dy3)

        return fwd, fwd_bwd, x3


def prepare(device, W, A, B, scaling: float, p: float, seed: int = SEED, root=None) -> Prepared:
    """Load LoRAFusion, map the GPU to its config table, fit the kernel configs to (K, N, r, p) on W, A, B."""
    device = torch.device(device)
    lf = load(root)  # first: a missing source is the more useful reason
    if device.type != "cuda" or not torch.cuda.is_available():
        raise LoRAFusionUnavailable(f"LoRAFusion's Triton kernels need a CUDA GPU (device {device}, "
                                    f"cuda available: {torch.cuda.is_available()})")
    if not (W.dtype == A.dtype == B.dtype):
        raise LoRAFusionUnavailable(f"LoRAFusion needs W, A, B of one dtype (got {W.dtype}, {A.dtype}, {B.dtype})")
    with torch.cuda.device(device):
        hw, tuned, cfg_note = hardware_config(lf)
        configs, changes = fit_configs(lf, tuned, W, A, B, scaling, p)
    note = (f"LoRAFusion {COMMIT} lora_v1 non-TMA kernels, adapters {str(A.dtype).replace('torch.', '')} "
            f"(needs x's dtype), x as (1,M,K); {cfg_note}")
    if changes:
        note += "; " + ", ".join(changes)
    if lf.lora_v1.USE_FUSED_DROPOUT_MATMUL:  # LORAFUSION_USE_FUSED_DROPOUT_MATMUL=1 in the environment
        note += "; fused dropout-matmul"
    if lf.standins:
        note += "; stand-in " + ", ".join(lf.standins)
    return Prepared(lf, hw, configs, scaling, p, seed, note)
