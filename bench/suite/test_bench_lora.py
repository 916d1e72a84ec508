"""LoRA layer benchmarks (pytest-benchmark).

    python3 -m pytest bench/suite/test_bench_lora.py --benchmark-json out.json [--quick] [--providers a,b]
    python3 bench/tools/make_table.py out.json --out outdir/

pytest-benchmark's own timer does not know about CUDA streams, so each test calls our CUDA-event timer
(bench/suite/timing.py) once through ``benchmark.pedantic`` and stores the median in ``benchmark.extra_info``
(the table script reads only extra_info). Skipped without CUDA, unless LORA_KERNELS_BENCH_CPU_SMOKE=1 (tiny fp32
shapes on CPU, to test the plumbing).
"""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from providers import DORA_PROVIDERS, FLOOR, PROVIDERS, Unavailable, make_case, set_bytes
from timing import bench_ms, measure_memory, n_rotation_sets, peak_memory

CPU_SMOKE = os.environ.get("LORA_KERNELS_BENCH_CPU_SMOKE") == "1"
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (HAS_CUDA or CPU_SMOKE), reason="needs CUDA (or LORA_KERNELS_BENCH_CPU_SMOKE=1)")

# Llama-3-8B: q/o 4096->4096, k/v 4096->1024, gate/up 4096->14336, down 14336->4096
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
MS = [16, 2048, 8192]
RS = [16, 64]
PS = [0.0, 0.1]
MODES = ["fwd", "fwd_bwd"]
QUICK = dict(shapes=[(4096, 4096), (4096, 14336)], ms=[16, 8192], rs=[16], ps=[0.0, 0.1])
# (M, K, N) of the Triton/CUDA issues' targets
TARGETS = dict(mkn=[(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 4096, 4096),
                    (16, 4096, 4096)], rs=[16, 64], ps=[0.0, 0.1])
SMOKE = dict(shapes=[(128, 96), (96, 256)], ms=[16, 64], rs=[16], ps=[0.0, 0.1])
# --dora: the DoRA issue's grid (the four shapes at M = 8192), DoRA providers next to LoRA's own and the floor
DORA = dict(shapes=SHAPES, ms=[8192], rs=[16, 64], ps=[0.0, 0.1])
DORA_DEFAULT = ["ours-dora-cuda", "ours-dora-triton", "ours-dora-cuda-recompute", "ours-dora-cuda-savez", "peft-dora",
                "ours-cuda", "ours-triton", "peft-layer", FLOOR]

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def pytest_generate_tests(metafunc):
    if "cfg" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    if CPU_SMOKE and not HAS_CUDA:
        sel = SMOKE
    elif opt("--dora"):
        sel = DORA
    elif opt("--targets"):
        sel = TARGETS
    elif opt("--quick"):
        sel = QUICK
    else:
        sel = dict(shapes=SHAPES, ms=MS, rs=RS, ps=PS)
    mkn = sel.get("mkn") or [(M, K, N) for (K, N) in sel["shapes"] for M in sel["ms"]]
    providers = list(DORA_DEFAULT if opt("--dora") else PROVIDERS)
    if opt("--providers"):
        want = [p.strip() for p in opt("--providers").split(",") if p.strip()]
        providers = [p for p in list(PROVIDERS) + list(DORA_PROVIDERS) if p in want]
    shard, n_shards = 0, 1
    if opt("--shard"):
        shard, n_shards = (int(v) for v in opt("--shard").split("/"))
        if not 0 <= shard < n_shards:
            raise ValueError(f"--shard {opt('--shard')}: expected i/n with 0 <= i < n")
    params, ids = [], []
    groups = [(M, K, N, r, p) for (M, K, N) in mkn for r in sel["rs"] for p in sel["ps"]]
    for gi, (M, K, N, r, p) in enumerate(groups):
        if gi % n_shards != shard:
            continue
        for mode in MODES:
            for prov in providers:
                params.append((prov, K, N, M, r, p, mode))
                ids.append(f"{K}x{N}-M{M}-r{r}-p{p}-{mode}-{prov}")
    metafunc.parametrize("cfg", params, ids=ids)


_FLOOR_CACHE: dict = {}
_ENV: dict = {}


def _env(config):
    if not _ENV:
        from conftest import env_info

        _ENV.update(env_info())
    return _ENV


def _compile_mode(config):
    mode = config.getoption("--compile-mode")
    if mode:
        return mode
    return "default" if (config.getoption("--quick") or not HAS_CUDA) else "max-autotune-no-cudagraphs"


def _timer_kwargs(config):
    return {"use_do_bench": bool(config.getoption("--use-do-bench")) and HAS_CUDA,
            "rep_ms": config.getoption("--rep-ms"), "warmup_ms": config.getoption("--warmup-ms"),
            "gpu_reps": config.getoption("--gpu-reps")}


def _cleanup():
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


def _floor_ms(config, K, N, M, mode):
    key = (K, N, M, mode)
    if key not in _FLOOR_CACHE:
        n_sets = n_rotation_sets(set_bytes(M, K, N, 16, DTYPE))
        case = make_case(FLOOR, M, K, N, 16, 0.0, dtype=DTYPE, device=DEVICE, n_sets=n_sets)
        res = bench_ms(getattr(case, mode), **_timer_kwargs(config))
        _FLOOR_CACHE[key] = (res["median_ms"], res.get("gpu_ms"))
        del case
        _cleanup()
    return _FLOOR_CACHE[key]


def test_lora_layer(benchmark, cfg, request):
    prov, K, N, M, r, p, mode = cfg
    config = request.config
    n_sets = n_rotation_sets(set_bytes(M, K, N, r, DTYPE))
    torch.manual_seed(0)
    try:
        case = make_case(prov, M, K, N, r, p, dtype=DTYPE, device=DEVICE, n_sets=n_sets,
                         compile_mode=_compile_mode(config), compile_dynamic=config.getoption("--compile-dynamic"),
                         adapter_dtype=getattr(torch, config.getoption("--adapter-dtype")),
                         b_scale=config.getoption("--b-scale"))
    except Unavailable as e:
        pytest.skip(str(e))
    fns = getattr(case, mode)
    result = {}

    def target():
        result.update(bench_ms(fns, **_timer_kwargs(config)))
        return result["median_ms"]

    benchmark.pedantic(target, rounds=1, iterations=1, warmup_rounds=0)
    med = result["median_ms"]
    gpu = result.get("gpu_ms")
    floor, floor_gpu = _floor_ms(config, K, N, M, mode) if prov != FLOOR else (med, gpu)
    flops = case.flops_fwd if mode == "fwd" else case.flops_fwd_bwd
    info = {
        "provider": prov, "K": K, "N": N, "shape": f"{K}->{N}", "M": M, "r": r, "p": p, "mode": mode,
        "dtype": str(DTYPE).replace("torch.", ""), "adapter_dtype": case.adapter_dtype, "note": case.note,
        "b_scale": config.getoption("--b-scale"),
        "median_ms": med, "p20_ms": result.get("p20_ms"), "p80_ms": result.get("p80_ms"),
        "reps": result.get("reps"), "rotation_sets": result.get("sets"),
        "tflops": flops / (med * 1e-3) / 1e12 if med > 0 else None, "flops": flops,
        "floor_ms": floor, "ratio_to_floor": med / floor if floor else None,
        "gpu_ms": gpu, "gpu_hidden_ok": result.get("gpu_hidden_ok"), "gpu_hidden_frac": result.get("gpu_hidden_frac"),
        "floor_gpu_ms": floor_gpu,
        "gpu_ratio_to_floor": gpu / floor_gpu if (gpu and floor_gpu) else None,
        "timer": "do_bench" if _timer_kwargs(config)["use_do_bench"] else "cuda-events-rotating",
        "rep_ms": config.getoption("--rep-ms"), "gpu_reps": config.getoption("--gpu-reps"),
    }
    if mode == "fwd_bwd":
        mem = measure_memory(fns[0], exclude=case.exclude, inputs=case.inputs)
        info.update({k: v for k, v in mem.items()})
        if getattr(fns[0], "autograd_dy", None) is not None:  # the upstream grad made by autograd (providers.py)
            info["peak_bytes_autograd_dy"] = peak_memory(fns[0].autograd_dy)
    info.update({f"env_{k}": v for k, v in _env(config).items()})
    benchmark.extra_info.update(info)
    if config.getoption("--jsonl"):  # one line per result as it is measured: a run cut short keeps its rows
        with open(config.getoption("--jsonl"), "a") as f:
            f.write(json.dumps(info, default=str) + "\n")
    del case, fns
    _cleanup()
