#!/usr/bin/env python3
"""Decode cost of a remote host tier, modelled (issue 17).

Per sparse layer and decode step the worker asks the node for every KV
head's selected K and V rows (one request, sent one layer ahead, so it
overlaps one layer of compute). A request takes
    t = rtt + overhead + bytes / min(link, transport)
and adds max(0, t - layer_time) to the step. Parameters: the 8B shape
(31 sparse layers, 8 KV heads, 256-byte bf16 rows of K or V, Top-896), the
H100 layer time measured for the default plan at 128k (226 us, docs/results.md,
"The concurrent timeline"), the transports' throughput and overhead as
measured on this 2-core machine (docs/results/remote-kv-host-cpu-2026-12-07).
Usage: scripts/remote_cost_model.py
"""

LAYERS, HEADS, ROW, TOP_K = 31, 8, 256, 896
LAYER_US = 226.0
TRANSPORTS = {  # name: (GB/s the transport itself reaches, fixed us a request)
    # tkv_remote_rows_bench across two namespaces on this 2-core machine
    # (both ends and the copies share 2 cores): 3.67 MB requests
    "gRPC stream (measured here)": (1.04, 60.0),
    "rows channel (measured here)": (1.18, 40.0),
    "link-bound (a transport faster than the link)": (1000.0, 10.0),
}
LINKS_GBIT = (10, 25, 100)
RTTS_US = (10, 50, 200)


def step_ms(reuse, link_gbit, rtt, transport):
    gbps, fixed = transport
    nbytes = 2 * HEADS * TOP_K * ROW * (1.0 - reuse)
    rate = min(link_gbit / 8.0, gbps) * 1e3  # bytes per us
    t = rtt + fixed + nbytes / rate
    return LAYERS * max(0.0, t - LAYER_US) / 1e3, nbytes


def main():
    for reuse in (0.0, 0.8):
        _, nbytes = step_ms(reuse, 10, 10, (1, 0))
        print(f"\nrows reused {reuse:.0%}: {nbytes / 1e6:.2f} MB a layer, {LAYERS * nbytes / 1e6:.0f} MB a token")
        print("| transport | link | " + " | ".join(f"RTT {r} us" for r in RTTS_US) + " |")
        print("|---|---|" + "---|" * len(RTTS_US))
        for name, tr in TRANSPORTS.items():
            for link in LINKS_GBIT:
                cells = [f"+{step_ms(reuse, link, r, tr)[0]:.1f}" for r in RTTS_US]
                print(f"| {name} | {link} Gb/s | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
