"""pytest options for the LoRA benchmarks (bench/suite/test_bench_lora.py)."""
from __future__ import annotations

import datetime
import platform


def pytest_addoption(parser):
    g = parser.getgroup("lora-bench")
    g.addoption("--quick", action="store_true", default=False,
                help="subset: M in {16, 8192}, shapes 4096->4096 and 4096->14336, r=16, p in {0, 0.1}")
    g.addoption("--targets", action="store_true", default=False,
                help="the issue-target grid: M x K -> N in 8192x4096->4096, 8192x4096->14336, 8192x14336->4096, "
                     "2048x4096->4096, 16x4096->4096; r in {16, 64}; p in {0, 0.1}")
    g.addoption("--dora", action="store_true", default=False,
                help="the DoRA grid: the four Llama shapes at M=8192, r in {16, 64}, "
                     "p in {0, 0.1}; providers ours-dora-cuda/-triton, ours-dora-cuda-recompute (z recomputed at "
                     "p = 0 too), ours-dora-cuda-savez (z saved for backward), peft-dora, LoRA's ours-cuda/-triton "
                     "and peft-layer, and the floor (--providers picks from all, ours-dora-torch and the triton "
                     "-recompute/-savez included)")
    g.addoption("--b-scale", type=float, default=1.0,
                help="lora_B times this (default 1: B std r^-1/2, so ‖s·B A‖_row ≈ 2 ‖W‖_row, past DoRA's 1/2 at which "
                     "the saved-y backward recomputes z in every column; 0.05 gives 0.1 ‖W‖_row, a trained adapter's "
                     "size, where it recomputes none)")
    g.addoption("--adapter-dtype", default="float32", choices=["float32", "bfloat16"],
                help="dtype of lora_A / lora_B for the ours-* providers (float32: PEFT's default)")
    g.addoption("--compile-mode", default=None,
                help='torch.compile mode of compile-formula (default "max-autotune-no-cudagraphs"; '
                     'with --quick: "default", to keep the quick run short)')
    g.addoption("--providers", default=None, help="comma-separated subset of providers")
    g.addoption("--compile-dynamic", action="store_true", default=False,
                help="compile-formula: one dynamic-shape graph for every shape instead of a compile per shape "
                     "(what makes the full grid fit; the note column says which)")
    g.addoption("--shard", default=None,
                help="i/n: run only the groups (shape, M, r, p) whose index mod n is i, so that a long grid splits "
                     "over n device calls; merge with make_table.py a.json b.json ...")
    g.addoption("--jsonl", default=None,
                help="also append each result to this JSON-lines file as soon as it is measured (the pytest-benchmark "
                     "JSON is only written at the end; make_table.py reads either)")
    g.addoption("--rep-ms", type=float, default=100.0, help="timed window per measurement (ms)")
    g.addoption("--warmup-ms", type=float, default=25.0, help="warm-up per measurement (ms)")
    g.addoption("--gpu-reps", type=int, default=40, help="reps of the GPU-time (sleep-queued) measurement")
    g.addoption("--use-do-bench", action="store_true", default=False,
                help="time with triton.testing.do_bench (L2 flush) instead of the rotating CUDA-event timer")


def env_info() -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
            info["l2_bytes"] = getattr(props, "L2_cache_size", None)
        else:
            info["gpu"] = "none (CPU)"
    except Exception as e:  # pragma: no cover
        info["torch"] = f"unavailable: {e}"
    for mod in ("triton", "peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import lora_kernels

        info["lora_kernels"] = getattr(lora_kernels, "__version__", "?")
        info["backends"] = list(lora_kernels.available_backends())
    except Exception as e:
        info["lora_kernels"] = f"import failed: {type(e).__name__}: {e}"[:200]
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lora_bench"] = env_info()
