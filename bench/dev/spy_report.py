"""Summarise a py-spy raw (collapsed-stack) record of bench/dev/host_spy.py: the samples inside ``one_call``, by
frame (inclusive: the share of samples whose stack holds that frame) and by leaf (self), scaled to microseconds per
call with the loop's own host time.

    python3 bench/dev/spy_report.py spy.txt [--calls-file spy.txt.calls] [--top 40]

Frames are shortened to ``function (library or file)``; a native frame without a symbol counts under its library
(``[libcuda.so.1]``), so a driver's stripped code shows as one line.
"""
from __future__ import annotations

import argparse
import collections
import json
import re

_ADDR = re.compile(r"^0x[0-9a-f]+ \((.+)\)$")


def short(frame: str) -> str:
    m = _ADDR.match(frame)
    if m:
        return f"[{m.group(1)}]"
    frame = re.sub(r":\d+\)$", ")", frame)  # python line numbers: one line per function
    frame = re.sub(r"\(.*/", "(", frame)  # paths: the file name
    return frame if len(frame) <= 150 else frame[:147] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--calls-file", default=None)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--root", default="one_call (host_spy.py")
    a = ap.parse_args()
    incl, leaf = collections.Counter(), collections.Counter()
    total = inside = 0
    with open(a.raw) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            total += n
            frames = stack.split(";")
            roots = [i for i, fr in enumerate(frames) if fr.startswith(a.root)]
            if not roots:
                continue
            inside += n
            below = [short(fr) for fr in frames[roots[0] + 1:]]
            for fr in set(below):
                incl[fr] += n
            leaf[below[-1] if below else "(one_call itself)"] += n
    scale = None
    if a.calls_file:
        with open(a.calls_file) as f:
            info = json.load(f)
        scale = info["host_us_per_call"]
        print(f"# {info['provider']} {info['mode']} M={info['M']} {info['shape']} r={info['r']} p={info['p']}: "
              f"{info['calls']} calls, {scale:.1f} host us per call (loop clock, profiler attached)")
    print(f"# {inside} of {total} samples inside one_call")
    if not inside:
        return

    def row(n):
        us = f"{scale * n / inside:8.1f} us" if scale else ""
        return f"{100.0 * n / inside:6.1f}% {us}"

    print("\n## inclusive (share of one_call's samples whose stack holds the frame)")
    for fr, n in incl.most_common(a.top):
        print(f"{row(n)}  {fr}")
    print("\n## self (leaf frames)")
    for fr, n in leaf.most_common(a.top):
        print(f"{row(n)}  {fr}")
    libs = collections.Counter()
    for fr, n in leaf.items():
        m = re.search(r"\(([^()]*)\)$", fr) or re.search(r"\[(.*)\]$", fr)
        libs[m.group(1) if m else fr] += n
    print("\n## self by library or file")
    for lib, n in libs.most_common(a.top):
        print(f"{row(n)}  {lib}")


if __name__ == "__main__":
    main()
