#!/usr/bin/env python3
"""Kernel time of one decode step from an ncu CSV.

Input: `ncu --csv --metrics gpu__time_duration.sum --graph-profiling node`
output (optionally .xz). A step starts at each embedding kernel; the last
complete step is summed per kernel name (ncu runs kernels one at a time, so
the total is the step's kernel time without overlap).
Usage: scripts/ncu_step_summary.py FILE.csv[.xz]
"""
import collections
import csv
import io
import lzma
import re
import sys


def main(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[head:]))))
    starts = [i for i, r in enumerate(rows) if "EmbeddingKernel" in r["Kernel Name"]]
    if len(starts) < 2:
        sys.exit("fewer than two steps in the file")
    step = rows[starts[-2]:starts[-1]]
    agg = collections.defaultdict(lambda: [0, 0.0])
    for r in step:
        name = re.sub(r"\(.*$", "", r["Kernel Name"].replace("void ", "").replace("(anonymous namespace)::", ""))
        name = name.replace("unnamed>::", "")
        agg[name][0] += 1
        agg[name][1] += float(r["Metric Value"].replace(",", "")) / 1000.0
    total = sum(t for _, t in agg.values())
    print(f"# one decode step: {len(step)} kernels, {total:.1f} us of kernel time (serialized)")
    print(f"# {'us':>9} {'calls':>5} {'us/call':>8}  kernel")
    for name, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"{t:11.1f} {n:5d} {t / n:8.1f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
