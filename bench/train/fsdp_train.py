"""FSDP2 LoRA training of the small Llama, patched with lora_kernels.patch_peft.

    torchrun --nproc_per_node N bench/train/fsdp_train.py [--tiny] [--dropout 0.05] [--ddp] --out fsdp.json

fully_shard on each decoder layer, then the root; nccl on GPU, gloo on CPU. The global batch (--batch rows)
is the same for every world size and is split by rank, so at dropout 0 the losses match a 1-process run.
Rank 0 writes losses, step times and peak memory per rank as JSON. --ddp uses DistributedDataParallel
instead of FSDP2 (fallback).
"""
import os

# NVLink multicast / NVLS off (must be set before NCCL / symmetric memory init; inherited by children)
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

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
    ap.add_argument("--ddp", action="store_true", help="DDP instead of FSDP2")
    ap.add_argument("--no-patch", action="store_true", help="plain PEFT (no patch_peft)")
    ap.add_argument("--cpu", action="store_true", help="force CPU/gloo")
    ap.add_argument("--out", default="fsdp.json")
    args = finalize_args(ap.parse_args(argv))

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

    model = build_model(args, args.dropout, device)
    report = None if args.no_patch else patch_peft(model, backend=args.backend)
    model.train()
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[local] if use_cuda else None)
        mode = "ddp"
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
        mode = "fsdp2"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    per = args.batch // world
    data = batches(args, args.steps, "cpu", seed_offset=2000)  # same global data as e2e_train's loss curve
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for ids in data:
        ids = ids[rank * per:(rank + 1) * per].to(device)
        sync(device)
        t0 = time.perf_counter()
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
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        res = {"mode": mode, "world_size": world, "backend": "nccl" if use_cuda else "gloo",
               "dropout": args.dropout, "patched": not args.no_patch,
               "patch_report": str(report)[:2000] if report is not None else None,
               "losses": losses, "step_s": times,
               "step_s_median_after_2": statistics.median(times[2:]) if len(times) > 2 else None,
               "tokens_per_s": args.batch * args.seq / statistics.median(times[2:]) if len(times) > 2 else None,
               "peak_mem_gib_per_rank": peaks, "args": vars(args), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if use_cuda else "cpu"}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"[fsdp] {mode} world={world} losses {losses[0]:.5f} -> {losses[-1]:.5f}; "
              f"median step {res['step_s_median_after_2']}; peak GiB {peaks}; wrote {args.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the process group destroyed. Skip C++ static teardown: gloo's can abort there
    # ("terminate called without an active exception", exit -6; seen once in about 8 CPU runs of the 2-rank test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
