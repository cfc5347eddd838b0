#!/usr/bin/env python3
"""Summarizes decode-step traces written by `tkv_llama_bench --trace-dir`.

Per file: the per-step wall time, the sum of kernel durations, each stream's
ops and busy time (the union of its intervals) and top ops, as the benchmark
prints them; then a per-layer view of the main stream (the busiest): each
step is split at the attention kernels (one per layer), and for each layer
it reports the median over steps of
  gap   the main stream's idle time right before the attention kernel
        (waiting for the selection joined there, for sparse layers),
  main  the main stream's busy time since the previous attention kernel,
  side  the busy time of the other streams' ops that start in that
        interval (the selection; not cut at the attention kernel).

  scripts/trace_summary.py out/trace/trace_131072_*.json
  scripts/trace_summary.py --by-name trace.json   # main/side by kernel name

--by-name classifies ops as side work by name (--side REGEX) instead of by
stream, for when CUPTI reports graph kernels on the graph's internal
streams rather than the two the backend captured from; the "side-named
share" column of the stream table tells whether streams and names agree.
"""
import argparse
import json
import re
import statistics
from collections import defaultdict

STEP_MARKER = "EmbeddingKernel"
ATTENTION = r"Attention|QuantDecodeKernel"
# Kernels of the per-layer selection (speculative query, index scores,
# Top-K, row reuse, zero-copy gather); cuda_backend.cc enqueues them on the
# side stream.
SIDE = r"SpecQuery|Score|TopK|Gather|MapThroughPool|ReuseRows|HostRows|GroupMean|ChooseChannels"


def union_us(intervals, lo, hi):
    total, cur = 0.0, None
    for b, e in sorted((max(lo, min(b, hi)), max(lo, min(e, hi))) for b, e in intervals):
        if cur and b <= cur[1]:
            cur[1] = max(cur[1], e)
            continue
        if cur:
            total += cur[1] - cur[0]
        cur = [b, e]
    return total + (cur[1] - cur[0] if cur else 0.0)


def split_steps(records):
    """Lists of records per step, as kernel_trace.cc's SplitSteps: one step
    per marker kernel, two steps parted at the longest no-kernel stretch
    between their markers; copies outside the kernels' span are dropped."""
    kernels = [r for r in records if r["kind"] == "kernel"]
    if not kernels:
        return []
    gaps, markers, max_end = [0.0], [], kernels[0]["end_us"]
    for k, r in enumerate(kernels):
        if k:
            gaps.append(max(0.0, r["start_us"] - max_end))
            max_end = max(max_end, r["end_us"])
        if STEP_MARKER in r["name"]:
            markers.append(k)
    cuts = [0]
    for a, b in zip(markers, markers[1:]):
        cuts.append(max(range(a + 1, b + 1), key=lambda k: gaps[k]))
    cuts.append(len(kernels))
    steps = []
    for a, b in zip(cuts, cuts[1:]):
        begin = kernels[a]["start_us"]
        end = max(r["end_us"] for r in kernels[a:b])
        ops = [r for r in records if begin <= r["start_us"] <= end]
        steps.append((begin, end, ops))
    return steps


def summarize(path, args):
    with open(path) as f:
        trace = json.load(f)
    records = sorted(trace["records"], key=lambda r: r["start_us"])
    print(f"== {path}: context {trace.get('context')}, plan {trace.get('plan')}, "
          f"timed {trace.get('ms_per_token_median', 0):.3f} ms/token, "
          f"floor {trace.get('hbm_floor_ms', 0):.3f} ms, dropped {trace.get('dropped_records', 0)}")
    if trace.get("plan_summary"):
        print(f"   {trace['plan_summary']}")
    steps = split_steps(records)
    if not steps:
        print("   no kernel records")
        return
    side_re, att_re = re.compile(args.side), re.compile(args.attention)
    n = len(steps)
    busy = defaultdict(float)            # stream -> us over all steps
    ops = defaultdict(int)
    side_named = defaultdict(float)      # stream -> us of side-named ops
    by_name = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    step_busy = []
    for begin, end, step_ops in steps:
        per = defaultdict(list)
        for r in step_ops:
            d = r["end_us"] - r["start_us"]
            per[r["stream"]].append((r["start_us"], r["end_us"]))
            ops[r["stream"]] += 1
            if side_re.search(r["name"]):
                side_named[r["stream"]] += d
            agg = by_name[r["stream"]][r["name"]]
            agg[0] += d
            agg[1] += 1
        step_busy.append({s: union_us(v, begin, end) for s, v in per.items()})
        for s, v in step_busy[-1].items():
            busy[s] += v
    main = max(busy, key=busy.get)

    print("   step   wall ms   kernel sum ms   sum/wall   main idle ms")
    for i, (begin, end, step_ops) in enumerate(steps):
        wall = end - begin
        ksum = sum(r["end_us"] - r["start_us"] for r in step_ops if r["kind"] == "kernel")
        idle = wall - step_busy[i].get(main, 0.0)
        print(f"   {i:<6d} {wall / 1e3:8.3f}   {ksum / 1e3:13.3f}   {ksum / wall:8.2f}"
              f"   {idle / 1e3:12.3f}")
    print("   stream       ops/step   busy ms/step   side-named share")
    for s in sorted(busy):
        total = sum(v[0] for v in by_name[s].values())
        share = side_named[s] / total if total else 0.0
        role = " main" if s == main else ""
        print(f"   {s:<6d}{role:5s} {ops[s] / n:9.1f}   {busy[s] / 1e3 / n:12.3f}   {100 * share:15.0f}%")
    for s in sorted(busy):
        top = sorted(by_name[s].items(), key=lambda kv: -kv[1][0])[:args.top]
        role = " (main)" if s == main else ""
        print(f"   stream {s}{role}: top by summed time   ms/step  count/step  avg us")
        for name, (us, count) in top:
            print(f"     {name[:60]:60s} {us / 1e3 / n:8.3f}  {count / n:10.1f}  {us / count:6.1f}")

    # Per layer: the main path and the side work between attention kernels.
    if args.by_name:
        is_main = lambda r: not side_re.search(r["name"])
    else:
        is_main = lambda r: r["stream"] == main
    layers = defaultdict(lambda: defaultdict(list))  # layer -> column -> values over steps
    for begin, end, step_ops in steps:
        main_ops = [r for r in step_ops if is_main(r)]
        side_ops = [r for r in step_ops if not is_main(r)]
        atts = [r for r in main_ops if r["kind"] == "kernel" and att_re.search(r["name"])]
        prev = begin
        for j, att in enumerate(atts):
            t = att["start_us"]
            before = [r["end_us"] for r in main_ops if r["start_us"] < t]
            layers[j]["gap"].append(t - max(before) if before else 0.0)
            span = lambda rs: [(r["start_us"], r["end_us"]) for r in rs if prev <= r["start_us"] < t]
            layers[j]["main"].append(union_us(span(main_ops), prev, t))
            layers[j]["side"].append(union_us(span(side_ops), prev, float("inf")))
            layers[j]["name"] = att["name"]
            prev = t
    if not layers:
        print(f"   no main-path kernel matches --attention {args.attention!r}")
        return
    med = lambda v: statistics.median(v) if v else 0.0
    by = "name" if args.by_name else "stream"
    print(f"   per layer, median of {n} steps (main/side by {by}):")
    print("   layer   gap us   main us   side us   attention kernel")
    for j in sorted(layers):
        c = layers[j]
        print(f"   {j:5d} {med(c['gap']):8.1f} {med(c['main']):9.1f} {med(c['side']):9.1f}"
              f"   {c['name'][:40]}")
    gaps = sum(med(c["gap"]) for c in layers.values())
    print(f"   sum of median gaps before attention: {gaps / 1e3:.3f} ms per step")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", help="trace_<context>_<plan>.json files")
    p.add_argument("--top", type=int, default=12, help="ops listed per stream")
    p.add_argument("--attention", default=ATTENTION, help="regex of the per-layer attention kernel")
    p.add_argument("--side", default=SIDE, help="regex of side-stream (selection) op names")
    p.add_argument("--by-name", action="store_true", help="main/side by --side instead of by stream")
    args = p.parse_args()
    for path in args.traces:
        summarize(path, args)


if __name__ == "__main__":
    main()
