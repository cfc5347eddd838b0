#!/usr/bin/env python3
"""Plans that put the profiler's quant/sparse split elsewhere, at equal memory:
for each comma-separated layer set, a copy of the profiler's plan whose
quantized layers are exactly that set (same bits/group/residual), every other
layer sparse with the plan's sparse parameters. The copies drop the checksum
and the scores (they are not the profiler's) and keep the model digest.
Usage: scripts/split_elsewhere.py PLAN.json OUT_DIR 18 13 1,24"""
import copy
import json
import os
import sys


def main():
    plan_path, out_dir, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
    plan = json.load(open(plan_path))
    quant = [l for l in plan["layers"] if l["policy"] == "quant"]
    sparse = [l for l in plan["layers"] if l["policy"] == "sparse"]
    if not quant or not sparse:
        sys.exit("the plan needs both a quant and a sparse layer to copy parameters from")
    keys = {"quant": ["bits", "group", "residual"],
            "sparse": ["sink", "recent", "top_k", "channels", "index", "host_bits"]}
    os.makedirs(out_dir, exist_ok=True)
    for s in sets:
        want = {int(x) for x in s.split(",")}
        if len(want) != len(quant):
            sys.exit(f"set {s}: {len(want)} layers, the plan quantizes {len(quant)} (equal memory)")
        alt = {k: v for k, v in plan.items() if k not in ("checksum", "profile")}
        alt["name"] = f"split elsewhere: quant {s}"
        alt["layers"] = []
        for i in range(len(plan["layers"])):
            kind = "quant" if i in want else "sparse"
            src = quant[0] if kind == "quant" else sparse[0]
            alt["layers"].append({"layer": i, "policy": kind, **{k: src[k] for k in keys[kind]}})
        path = os.path.join(out_dir, f"quant_{s.replace(',', '_')}.json")
        json.dump(alt, open(path, "w"), indent=1)
        print(path)


if __name__ == "__main__":
    main()
