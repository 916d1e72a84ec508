"""Does a bad argument to the cuda backend's raw ops raise, or crash the process? Each case runs in a fresh
subprocess (a crash there is a signal, not this script's end); a crashing case is re-run under gdb, when the machine
has it, for the C++ backtrace.

    python3 bench/dev/bad_input_probe.py
"""
import shutil
import subprocess
import sys

SETUP = """
import torch
from lora_kernels.backends import cuda_backend as cb
M, K, N, r = 256, 128, 256, 8
x = torch.randn(M, K, device="cuda").bfloat16(); W = torch.randn(N, K, device="cuda").bfloat16()
b = torch.randn(N, device="cuda").bfloat16(); A = torch.randn(r, K, device="cuda"); B = torch.randn(N, r, device="cuda")
c = torch.rand(N, device="cuda"); dy = torch.randn(M, N, device="cuda").bfloat16()
_, u = cb.forward(x, W, b, A, B, 0.5, 0.0, 0, 0)
"""
CASES = {
    "forward, bias of N - 1": "cb.forward(x, W, b[:-1], A, B, 0.5, 0.0, 0, 0)",
    "forward, bias on the CPU": "cb.forward(x, W, b.cpu(), A, B, 0.5, 0.0, 0, 0)",
    "forward, 1-D x (the dim check: an int and a shape)": "cb.forward(x[0], W, b, A, B, 0.5, 0.0, 0, 0)",
    "forward, weight (N, K - 8) (an int and a shape)": "cb.forward(x, W[:, :-8].contiguous(), b, A, B, 0.5, 0.0, 0, 0)",
    "forward_scaled, col_scale float64": "cb.forward_scaled(x, W, b, A, B, c.double(), 0.5, 0.0, 0, 0)",
    "forward_scaled, col_scale of N - 1": "cb.forward_scaled(x, W, b, A, B, c[:-1], 0.5, 0.0, 0, 0)",
    "forward_scaled, col_scale on the CPU": "cb.forward_scaled(x, W, b, A, B, c.cpu(), 0.5, 0.0, 0, 0)",
    "backward_dx_from, dx_from (M, N - 1)": "cb.backward_dx_from(dy, x, W, A, B, u, dy[:, :-1], 0.5, 0.0, 0, 0, True, True, True)",
}


def run(code, gdb=False):
    cmd = [sys.executable, "-X", "faulthandler", "-c", code]
    if gdb:
        cmd = ["gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


for name, call in CASES.items():
    code = SETUP + f"""
try:
    {call}
    print("RESULT no error")
except Exception as e:
    print("RESULT raised", type(e).__name__, str(e).splitlines()[0][:160])
"""
    p = run(code)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    print(f"{name}: {lines[0] if lines else f'CRASHED rc={p.returncode}'}", flush=True)
    if not lines:
        print("   " + "\n   ".join(p.stderr.strip().splitlines()[-6:]))
        if shutil.which("gdb"):
            g = run(code, gdb=True)
            print("   gdb:\n   " + "\n   ".join([ln for ln in g.stdout.splitlines() if ln.startswith("#")][:25]))
