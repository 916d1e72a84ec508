"""Which way of failing a check in a torch C++ extension built on this machine raises, and which crashes? A tiny
extension (torch.utils.cpp_extension.load_inline, the same compiler as setup.py's build) with one function per
message style; each case runs in a fresh subprocess, so a crash is a signal, not this script's end.

    python3 bench/dev/check_fail_probe.py        (needs a C++ compiler and ninja; about a minute to build)
"""
import os
import subprocess
import sys
import tempfile

SRC = r"""
#include <torch/extension.h>
#include <sstream>
#include <string>
void check_int(int64_t n) { TORCH_CHECK(n < 0, "int streamed: ", n); }
void check_double(double v) { TORCH_CHECK(v < 0, "double streamed: ", v); }
void check_dtype(at::Tensor t) { TORCH_CHECK(false, "dtype streamed: ", t.scalar_type()); }
void check_text(int64_t n) { TORCH_CHECK(n < 0, "text only"); }
void check_string(int64_t n) { TORCH_CHECK(n < 0, std::string("to_string: ") + std::to_string(n)); }
std::string ostream_int(int64_t n) { std::ostringstream ss; ss << n; return ss.str(); }
"""
FUNCS = ["check_int", "check_double", "check_dtype", "check_text", "check_string", "ostream_int"]
CALL = {"check_double": "m.check_double(1.5)", "check_dtype": "m.check_dtype(torch.ones(1))"}


def main():
    build = os.environ.get("CHECK_FAIL_BUILD", tempfile.mkdtemp(prefix="check_fail_"))
    load = (f"import torch\nfrom torch.utils.cpp_extension import load_inline\n"
            f"m = load_inline('check_fail_probe', {SRC!r}, functions={FUNCS!r}, build_directory={build!r}, "
            f"verbose=False)\n")
    b = subprocess.run([sys.executable, "-c", load + "print('BUILT')"], capture_output=True, text=True, timeout=400)
    if "BUILT" not in b.stdout:
        print("build failed:", (b.stdout + b.stderr)[-1500:])
        return
    for f in FUNCS:
        call = CALL.get(f, f"m.{f}(7)")
        code = load + f"""
try:
    r = {call}
    print("RESULT returned", repr(r))
except Exception as e:
    print("RESULT raised", type(e).__name__, str(e).splitlines()[0][:120])
"""
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           timeout=300)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
        print(f"{f}: {lines[0] if lines else f'CRASHED rc={p.returncode}'}", flush=True)


if __name__ == "__main__":
    main()
