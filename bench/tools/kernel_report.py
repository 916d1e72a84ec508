"""Per-kernel build report of the CUDA kernels, on a machine without a GPU: what ptxas allocates (registers, stack,
spills, static shared memory), PTX instruction counts of the memory and tensor-core operations, and a hash of each
kernel's SASS. Two reports compared show whether a source change altered any kernel's code or resources.

    python3 bench/tools/kernel_report.py --out before.json            # every torch-free csrc/*.cu, sm_90 and sm_80
    python3 bench/tools/kernel_report.py --out after.json --compare before.json

Kernels are keyed by arch and demangled name with anonymous namespaces removed, so moving a kernel between
translation units keeps its key. The SASS hash covers the kernel's .text section of the cubin (identical bytes mean
identical machine code).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PTX_OPS = {  # column -> PTX opcode prefix
    "ld.global": "ld.global",
    "st.global": "st.global",
    "cp.async": "cp.async",
    "mma": "mma.sync",
    "ldmatrix": "ldmatrix",
    "ld.shared": "ld.shared",
    "st.shared": "st.shared",
    "bar": "bar.sync",
}
RESOURCES = ("regs", "stack", "spill_st", "spill_ld", "smem")


def torch_free_sources() -> list[str]:
    out = []
    for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))):
        with open(f) as fh:
            if not re.search(r'#include\s*[<"](torch/|ATen/|c10/)', fh.read()):
                out.append(f)
    return out


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    clean = [re.sub(r"\(anonymous namespace\)::|lora_kernels::(detail::)?", "", d) for d in out.splitlines()]
    return dict(zip(names, clean))


def per_function(text: str, header: str, cols, count) -> dict[str, dict]:
    """{function: {col: value}} from the lines after each line matching `header` (group 1 names the function), up to
    the next such line: count(row, line) updates the function's row with each of its lines."""
    res: dict[str, dict] = {}
    row = None
    for line in text.splitlines():
        m = re.search(header, line)
        if m:
            row = res.setdefault(m.group(1), {k: 0 for k in cols})
        elif row is not None:
            count(row, line)
    return res


def ptxas_line(row: dict, line: str) -> None:
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        row["stack"], row["spill_st"], row["spill_ld"] = (int(v) for v in m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        row["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        row["smem"] = int(s.group(1)) if s else 0


def ptx_line(row: dict, line: str) -> None:
    ins = re.sub(r"^@!?%\w+\s+", "", line.strip())  # predicate guard
    for col, op in PTX_OPS.items():
        if ins.startswith(op):
            row[col] += 1


def parse_ptxas(text: str) -> dict[str, dict]:
    return per_function(text, r"Function properties for (\S+)", RESOURCES, ptxas_line)


def parse_ptx(text: str) -> dict[str, dict]:
    return per_function(text, r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\S+?)\s*\(", PTX_OPS, ptx_line)


def cubin_texts(path: str) -> dict[str, str]:
    """kernel name -> sha256 of its .text section (ELF64 little-endian cubin)."""
    with open(path, "rb") as fh:
        data = fh.read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx]
    out = {}
    for sec in secs:
        name_off, off, size = sec[0], sec[4], sec[5]
        start = strtab[4] + name_off
        name = data[start:data.index(b"\0", start)].decode()
        if name.startswith(".text."):
            out[name[len(".text."):]] = hashlib.sha256(data[off:off + size]).hexdigest()[:12] + f":{size}"
    return out


def build(src: str, arch: str, nvcc: str) -> tuple[str, dict[str, dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", "-c", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
               "--keep", "--keep-dir", tmp, f"-I{os.path.join(ROOT, 'csrc')}", src, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"nvcc failed on {src}:\n{res.stderr}")
        rows = parse_ptxas(res.stderr)
        for ptx in glob.glob(os.path.join(tmp, "*.ptx")):
            with open(ptx) as fh:
                for name, counts in parse_ptx(fh.read()).items():
                    rows.setdefault(name, {k: 0 for k in RESOURCES}).update(counts)
        for cubin in glob.glob(os.path.join(tmp, "*.cubin")):
            for name, sass in cubin_texts(cubin).items():
                if name in rows:
                    rows[name]["sass"] = sass
    return src, rows


def report(sources: list[str], archs: list[str], nvcc: str, jobs: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with cf.ThreadPoolExecutor(jobs) as pool:
        futs = [pool.submit(build, s, a, nvcc) for a in archs for s in sources]
        for fut, (a, _) in zip(futs, [(a, s) for a in archs for s in sources]):
            src, rows = fut.result()
            names = demangle(list(rows))
            for mangled, row in rows.items():
                row["file"] = os.path.relpath(src, ROOT)
                out[f"sm_{a} {names[mangled]}"] = row
    return dict(sorted(out.items()))


def compare(before: dict, after: dict) -> int:
    """Prints every kernel whose numbers differ; returns the number of kernels with more registers or spills."""
    worse = 0
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            print(f"{'only before' if a is None else 'only after'}: {key}")
            worse += a is None
            continue
        diffs = [f"{k} {b.get(k)} -> {a.get(k)}" for k in (*RESOURCES, *PTX_OPS, "sass") if b.get(k) != a.get(k)]
        if diffs:
            grew = any(a.get(k, 0) > b.get(k, 0) for k in ("regs", "stack", "spill_st", "spill_ld"))
            worse += grew
            print(f"{'WORSE ' if grew else ''}{key}: " + "; ".join(diffs))
    same = sum(1 for k in before if k in after and before[k].get("sass") == after[k].get("sass"))
    print(f"{len(before)} kernels before, {len(after)} after; identical SASS: {same}; with more registers, stack or "
          f"spills (or missing): {worse}")
    return worse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*", help="default: every csrc/*.cu without torch headers")
    ap.add_argument("--arch", action="append", help="compute capability, repeatable (default: 90 and 80)")
    ap.add_argument("--out", help="write the report as JSON")
    ap.add_argument("--compare", help="a report (JSON) to compare against")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    args = ap.parse_args()
    if shutil.which(args.nvcc) is None:
        sys.exit(f"{args.nvcc} not found")
    rows = report([os.path.abspath(s) for s in args.sources] or torch_free_sources(), args.arch or ["90", "80"],
                  args.nvcc, args.jobs)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    if args.compare:
        with open(args.compare) as fh:
            sys.exit(1 if compare(json.load(fh), rows) else 0)
    cols = (*RESOURCES, *PTX_OPS)
    print("kernel".ljust(60) + "".join(c.rjust(10) for c in cols))
    for key, row in rows.items():
        print(key[:59].ljust(60) + "".join(str(row.get(c, "")).rjust(10) for c in cols))


if __name__ == "__main__":
    main()
