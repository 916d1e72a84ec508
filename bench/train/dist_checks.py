"""Per-rank checks for `bench/train/fsdp_train.py --checks` (issue 18): NaNs, the device, backend and stream of the LoRA
ops, and the dropout RNG across ranks. Every function returns a JSON-able dict for this rank; fsdp_train gathers
them and `verdicts` turns the gathered dicts into booleans (None: does not apply to this run).

Dropout: PEFT's `nn.Dropout` draws its mask from the generator of x's device; lora_kernels draws one Philox seed
per call from torch's default CPU generator (lora_kernels/ops.py `_draw_seed`). `torch.manual_seed(s)` seeds both,
so the same seed on every rank gives the same masks on every rank (plain PyTorch's behaviour) and per-rank seeds
(accelerate's `set_seed(s, device_specific=True)`: s + process index) give per-rank masks, patched or not.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
from torch import nn


def lora_layers(model):
    """PEFT's lora.Linear modules of `model`, in module order."""
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def crc(t: torch.Tensor) -> int:
    """A fingerprint of a (bool) tensor: crc32 of its bytes on the CPU."""
    return zlib.crc32(t.detach().reshape(-1).to("cpu", torch.uint8).numpy().tobytes())


# ------------------------------------------------------------------------------------------------------ NaNs
def nan_check(model, losses) -> dict:
    """Losses finite, and every trainable parameter (this rank's shard under FSDP2) finite after training."""
    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor -> this rank's shard
            if not bool(torch.isfinite(t.detach()).all()):
                bad.append(name)
    return {"losses_finite": all(math.isfinite(x) for x in losses), "params_finite": not bad,
            "nonfinite_params": bad[:10]}


# -------------------------------------------------------------------------------------- device and stream
@contextlib.contextmanager
def record_ops(records: list):
    """Wraps lora_kernels.ops.lora_linear (what patch_peft's forward calls) to record, per call, the devices of x and
    y, the backend it resolves to, and (CUDA) the current device and stream at the call."""
    import lora_kernels.ops as ops

    orig = ops.lora_linear

    def wrapped(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None):
        y = orig(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=training, backend=backend)
        rec = {"x": str(x.device), "y": str(y.device),
               "backend": ops._dispatch.resolve(backend, x.device.type, x.dtype == torch.float64)}
        if x.is_cuda:
            rec["current_device"] = torch.cuda.current_device()
            rec["stream"] = torch.cuda.current_stream(x.device).cuda_stream
        records.append(rec)
        return y

    ops.lora_linear = wrapped
    try:
        yield records
    finally:
        ops.lora_linear = orig


def _poison_pool(device, large_bytes=1 << 30, small=256):
    """Fill blocks of the caching allocator's pool for the current stream with NaN and free them: tensors the next
    kernels on this stream allocate start as NaN, so a kernel that reads them before they are written (because it
    ran on another stream, not ordered after the producer) gives NaN instead of a plausible number."""
    big = torch.full((large_bytes // 4,), float("nan"), device=device)
    smalls = [torch.full((128 * 1024,), float("nan"), device=device) for _ in range(small)]  # 512 KiB: small pool
    del big, smalls


def device_stream_check(model, ids, device, patched: bool, sleep_cycles: int = 100_000_000) -> dict:
    """One eval forward (no grad) on the default stream, recording the device of every LoRA layer's output and,
    patched, of every lora_linear call and the backend it resolves to. On CUDA, the same forward again on a fresh
    non-default stream, queued behind a GPU sleep on that stream and with the stream's allocator pool poisoned
    with NaN: a kernel that ran on another stream would read unwritten inputs. Its logits must equal the
    default-stream ones, and every lora_linear call must have seen the side stream as current."""
    res: dict = {"device": str(device)}
    outs: list = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(str(o.device))) for m in lora_layers(model)]
    was_training = model.training
    model.eval()
    try:
        calls: list = []
        with torch.no_grad(), record_ops(calls):
            ref = model(input_ids=ids).logits.float()
        res.update(lora_layer_calls=len(outs), lora_out_devices=sorted(set(outs)), op_calls=len(calls),
                   op_backends=sorted({c["backend"] for c in calls}),
                   op_devices=sorted({c["x"] for c in calls} | {c["y"] for c in calls}),
                   ref_finite=bool(torch.isfinite(ref).all()))
        if device.type == "cuda":
            res["op_current_devices"] = sorted({c["current_device"] for c in calls})
            torch.cuda.synchronize(device)
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                _poison_pool(device)
            torch.cuda.synchronize(device)
            side_calls: list = []
            with torch.cuda.stream(side):
                torch.cuda._sleep(sleep_cycles)
                with torch.no_grad(), record_ops(side_calls):
                    out = model(input_ids=ids).logits.float()
            torch.cuda.current_stream(device).wait_stream(side)
            out.record_stream(torch.cuda.current_stream(device))
            diff = (out - ref).abs()
            res.update(side_op_calls=len(side_calls),
                       side_calls_saw_side_stream=all(c["stream"] == side.cuda_stream for c in side_calls),
                       side_stream_is_default=side.cuda_stream == torch.cuda.default_stream(device).cuda_stream,
                       side_finite=bool(torch.isfinite(out).all()),
                       side_max_abs_diff=float(diff.max()) if diff.numel() else 0.0,
                       side_exact=bool(torch.equal(out, ref)),
                       ref_max_abs=float(ref.abs().max()) if ref.numel() else 0.0)
            torch.cuda.synchronize(device)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return res


# ------------------------------------------------------------------------------------------------- dropout
@contextlib.contextmanager
def first_dropout(model, patched: bool, p: float, device):
    """Captures the mask of the first LoRA dropout call inside the block. Patched: the (seed, offset) of the first
    lora_kernels call (lora_kernels.record_dropout) and its mask, regenerated with lora_kernels.dropout_mask for
    that layer's input shape. Unpatched: the keep pattern of the first PEFT nn.Dropout call (output != 0 where the
    input is not 0). The dict yielded is filled when the block exits."""
    import lora_kernels

    out: dict = {}
    shapes: list = []
    masks: list = []
    hooks = []
    for m in lora_layers(model):
        hooks.append(m.register_forward_pre_hook(
            lambda _m, args: shapes.append(tuple(args[0].shape)) if not shapes else None))
        for d in m.lora_dropout.values():
            if isinstance(d, nn.Dropout):
                hooks.append(d.register_forward_hook(
                    lambda _m, i, o: masks.append((o != 0) | (i[0] == 0)) if not masks else None))
    try:
        with lora_kernels.record_dropout() as calls:
            yield out
    finally:
        for h in hooks:
            h.remove()
    out["ops_calls"] = len(calls)
    out["peft_dropout_called"] = bool(masks)
    if patched and calls:
        seed, offset = calls[0]
        K = shapes[0][-1]
        M = math.prod(shapes[0][:-1])
        out.update(seed=int(seed), offset=int(offset), shape=[M, K],
                   mask_crc=crc(lora_kernels.dropout_mask(seed, offset, (M, K), p, device=device)))
    elif masks:
        out.update(shape=list(masks[0].shape), mask_crc=crc(masks[0]))


def dropout_probe(model, ids, seed: int, rank: int, patched: bool, p: float, device) -> dict:
    """For 'same' (torch.manual_seed(seed) on every rank) and 'per_rank' (seed + rank, like accelerate's
    device_specific=True): the first LoRA dropout mask of a training-mode forward (no grad), and as the plain
    PyTorch reference the mask of F.dropout on this device right after the same seeding."""
    res = {}
    was_training = model.training
    model.train()
    try:
        for name, s in (("same", seed), ("per_rank", seed + rank)):
            torch.manual_seed(s)
            with torch.no_grad(), first_dropout(model, patched, p, device) as first:
                model(input_ids=ids)
            torch.manual_seed(s)
            ref = torch.nn.functional.dropout(torch.ones(4096, device=device), p=0.5, training=True) != 0
            res[name] = {"seed_set": s, "first": first, "torch_dropout_crc": crc(ref)}
    finally:
        model.train(was_training)
    return res


# ------------------------------------------------------------------------------------------------ verdicts
def _all_equal(xs):
    return all(x == xs[0] for x in xs)


def _all_distinct(xs):
    return len(set(xs)) == len(xs)


def _key(first: dict):
    """What identifies a rank's first mask: (seed, offset, crc) for ours, the crc for PEFT's nn.Dropout."""
    return (first.get("seed"), first.get("offset"), first.get("mask_crc"))


def _ops_on_own_device(d: dict) -> bool:
    """Every lora_linear call had x and y on this rank's device and (CUDA) that device current."""
    ok = d["op_calls"] > 0 and d["op_devices"] == [d["device"]]
    if "op_current_devices" in d:
        ok = ok and d["op_current_devices"] == [torch.device(d["device"]).index]
    return ok


def verdicts(per_rank: list, patched: bool, p: float, expect_backend: str | None, world: int) -> dict:
    """Booleans over the gathered per-rank check dicts (None where a check does not apply)."""
    v: dict = {}
    errors = [f"{k}: {c['error']}" for r in per_rank for k, c in r.items() if isinstance(c, dict) and "error" in c]
    if errors:
        v["checks_ran"] = False  # a check raised (its error is in checks_per_rank); the others still count
    v["no_nan"] = all(r.get("nan", {}).get("losses_finite") and r.get("nan", {}).get("params_finite")
                      for r in per_rank) and all(
        r["device_stream"].get("ref_finite", True) and r["device_stream"].get("side_finite", True)
        for r in per_rank if "device_stream" in r)
    ds = [r.get("device_stream") for r in per_rank]
    if all(ds) and not any("error" in d for d in ds):
        v["lora_outputs_on_own_device"] = all(
            d["lora_layer_calls"] > 0 and d["lora_out_devices"] == [d["device"]] for d in ds)
        if patched:
            v["ops_on_own_device"] = all(_ops_on_own_device(d) for d in ds)
            v["backend_expected"] = all(d["op_calls"] > 0 and (
                d["op_backends"] == [expect_backend] if expect_backend else len(d["op_backends"]) == 1) for d in ds)
        if all("side_max_abs_diff" in d for d in ds):
            v["side_stream_matches_default"] = all(
                d["side_finite"] and not d["side_stream_is_default"]
                and d["side_max_abs_diff"] <= 1e-3 * (1.0 + d["ref_max_abs"]) for d in ds)
            if patched:
                v["ops_saw_side_stream"] = all(
                    d["side_calls_saw_side_stream"] and d["side_op_calls"] == d["op_calls"] for d in ds)
    if p > 0 and world > 1:
        steps = [r.get("step0_dropout") for r in per_rank]
        if all(steps) and all(s.get("mask_crc") is not None for s in steps):
            v["step0_masks_equal_across_ranks"] = _all_equal([_key(s) for s in steps])
            if patched:
                v["step0_ours_not_peft_dropout"] = all(s["ops_calls"] > 0 and not s["peft_dropout_called"]
                                                       for s in steps)
        probes = [r.get("dropout_probe") for r in per_rank]
        if all(probes) and not any("error" in pr for pr in probes):
            same = [_key(pr["same"]["first"]) for pr in probes]
            per = [_key(pr["per_rank"]["first"]) for pr in probes]
            ok_first = all(pr[m]["first"].get("mask_crc") is not None for pr in probes for m in ("same", "per_rank"))
            v["same_seed_same_masks"] = ok_first and _all_equal(same)
            v["per_rank_seed_per_rank_masks"] = ok_first and _all_distinct(per)
            # the plain PyTorch reference behaves the same way (so ours follows torch's semantics)
            v["torch_reference_agrees"] = _all_equal([pr["same"]["torch_dropout_crc"] for pr in probes]) and \
                _all_distinct([pr["per_rank"]["torch_dropout_crc"] for pr in probes])
    return v
