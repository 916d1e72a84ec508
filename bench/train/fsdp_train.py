"""FSDP2 LoRA training of the small Llama, patched with lora_kernels.patch_peft.

    torchrun --nproc_per_node N bench/train/fsdp_train.py [--tiny] [--dropout 0.05] [--ddp] --out fsdp.json

fully_shard on each decoder layer, then the root; nccl on GPU, gloo on CPU. The global batch (--batch rows)
is the same for every world size and is split by rank, so at dropout 0 the losses match a 1-process run.
Rank 0 writes losses, step times and peak memory per rank as JSON. --ddp uses DistributedDataParallel
instead of FSDP2 (fallback).

--variants unpatched,patched trains plain PEFT and then the patched model in the same process (same init, data
and RNG state; the model is built once on the CPU and each variant trains a copy) and writes them as "runs".
--checks adds per-rank checks (bench/train/dist_checks.py): NaNs, the device/backend/stream of the LoRA ops and the
dropout masks across ranks. bench/train/two_gpu.sh runs the issue-18 set (FSDP2 and DDP on 2 GPUs) with both.
"""
import os

# NVLink multicast / NVLS off (must be set before NCCL / symmetric memory init; inherited by children)
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_common import add_model_args, batches, build_model, ensure_import_path, finalize_args, patch_peft, sync  # noqa

ensure_import_path()
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median step time")
    ap.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2")
    ap.add_argument("--no-patch", action="store_true", help="plain PEFT (no patch_peft)")
    ap.add_argument("--variants", default=None,
                    help="comma list of 'unpatched', 'patched': each in turn in this process, written as 'runs'")
    ap.add_argument("--checks", action="store_true", help="per-rank checks (bench/train/dist_checks.py)")
    ap.add_argument("--expect-backend", default=None,
                    help="with --checks: the lora_kernels backend the patched layers must run")
    ap.add_argument("--cpu", action="store_true", help="force CPU/gloo")
    ap.add_argument("--out", default="fsdp.json")
    args = finalize_args(ap.parse_args(argv))
    variants = args.variants.split(",") if args.variants else ["unpatched" if args.no_patch else "patched"]
    if any(v not in ("unpatched", "patched") for v in variants):
        raise SystemExit(f"--variants: expected 'unpatched' and/or 'patched', got {args.variants!r}")

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    use_cuda = torch.cuda.is_available() and not args.cpu
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by world size {world}")

    common = {"mode": "ddp" if args.ddp else "fsdp2", "world_size": world, "backend": "nccl" if use_cuda else "gloo",
              "dropout": args.dropout, "args": vars(args), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if use_cuda else "cpu"}
    gpus = [None] * world
    dist.all_gather_object(gpus, f"{common['gpu']} ({device})")
    common["gpus_per_rank"] = gpus
    base = build_model(args, args.dropout, "cpu")  # built once; same seed -> same weights on every rank
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if use_cuda else None)
    runs = []
    for i, variant in enumerate(variants):
        torch.set_rng_state(rng[0])  # every variant starts from the RNG state right after the build
        if use_cuda:
            torch.cuda.set_rng_state_all(rng[1])
        model = base if i == len(variants) - 1 else copy.deepcopy(base)
        try:
            res = train(args, model.to(device), variant == "patched", device, rank, world, local, use_cuda)
        except Exception as e:  # recorded; the next variant still runs (a rank stuck in a collective does not)
            res = {"variant": variant, "patched": variant == "patched",
                   "error": f"rank {rank}: {type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-4000:]}
            print(f"[fsdp] rank {rank} variant {variant} FAILED: {type(e).__name__}: {e}", flush=True)
        del model
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
        runs.append(res)
        if rank == 0:  # after each variant, so a later hang or crash keeps what ran
            out = {**common, **runs[0]} if not args.variants else {**common, "runs": runs}
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
            if "losses" in res:
                print(f"[fsdp] {common['mode']} world={world} {variant} p={args.dropout}: losses {res['losses'][0]:.5f}"
                      f" -> {res['losses'][-1]:.5f}; median step {res['step_s_median']}; peak GiB "
                      f"{res['peak_mem_gib_per_rank']}; checks {res.get('verdicts')}; wrote {args.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def train(args, model, patched, device, rank, world, local, use_cuda):
    """Train one variant for --steps steps; returns its results (rank 0's view, per-rank lists gathered)."""
    report = patch_peft(model, backend=args.backend) if patched else None
    model.train()
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[local] if use_cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if args.checks:
        import dist_checks

    per = args.batch // world
    data = batches(args, args.steps, "cpu", seed_offset=2000)  # same global data as e2e_train's loss curve
    if use_cuda:
        torch.cuda.synchronize(device)
        mem_start = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    losses, times, checks = [], [], {}
    for step, ids in enumerate(data):
        ids = ids[rank * per:(rank + 1) * per].to(device)
        sync(device)
        t0 = time.perf_counter()
        if args.checks and step == 0 and args.dropout > 0:
            with dist_checks.first_dropout(model, patched, args.dropout, device) as first:
                loss = wrapped(input_ids=ids, labels=ids).loss
            checks["step0_dropout"] = first
        else:
            loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().float().clone()
        dist.all_reduce(avg)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(avg) / world)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else None
    if args.checks:
        ids = data[0][rank * per:(rank + 1) * per, :min(args.seq, 256)].to(device)
        todo = [("nan", lambda: dist_checks.nan_check(model, losses)),
                ("device_stream", lambda: dist_checks.device_stream_check(model, ids, device, patched))]
        if args.dropout > 0:
            todo.append(("dropout_probe", lambda: dist_checks.dropout_probe(model, ids, args.seed, rank, patched,
                                                                            args.dropout, device)))
        for name, fn in todo:  # a check that raises is recorded as failed; the timings and losses are kept
            try:
                checks[name] = fn()
            except Exception as e:
                checks[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
                print(f"[fsdp] rank {rank} check {name} raised {type(e).__name__}: {e}", flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"peak": peak, "mem_start": mem_start if use_cuda else None, "checks": checks})
    timed = times[args.warmup:] if len(times) > args.warmup else times
    med = statistics.median(timed)
    res = {"variant": "patched" if patched else "unpatched", "patched": patched,
           "patch_report": str(report)[:2000] if report is not None else None,
           "losses": losses, "step_s": times, "warmup_steps": args.warmup,
           "step_s_median": med, "step_s_mean": statistics.mean(timed),
           "step_s_median_after_2": statistics.median(times[2:]) if len(times) > 2 else None,
           "tokens_per_s": args.batch * args.seq / med, "tokens_per_s_per_gpu": args.batch * args.seq / med / world,
           "peak_mem_gib_per_rank": [g["peak"] for g in gathered],
           "mem_start_gib_per_rank": [g["mem_start"] for g in gathered]}
    if args.checks:
        res["checks_per_rank"] = [g["checks"] for g in gathered]
        res["verdicts"] = dist_checks.verdicts(res["checks_per_rank"], patched, args.dropout, args.expect_backend,
                                               world)
    del wrapped, opt
    return res


if __name__ == "__main__":
    main()
    # Everything is written and the process group destroyed. Skip C++ static teardown: gloo's can abort there
    # ("terminate called without an active exception", exit -6; seen once in about 8 CPU runs of the 2-rank test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
