"""Two gpu-workers behind one gateway, one killed mid-run (issue 15).

Two real workers (CPU backend, SmolLM2, one generation at a time each) and a
gateway over both, driven by the official `openai` client:
- requests spread: after a burst, the gateway's per-worker counters and the
  workers' own GetLoad show work on both;
- four long streams (one running and one queued on each worker), then the
  worker running the first is SIGKILLed: its running stream ends with a clear
  error (the client raises, no hang), the request queued on it had received
  nothing and completes on the other worker (a retry), the other two
  complete; the dead worker leaves the rotation (/health, metrics) and new
  requests keep completing.

Usage: gateway_failover_test.py GATEWAY WORKER CLI MODEL
"""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai

from proc_test_util import SLOWDOWN, check, free_port, stop_all, wait_for

GATEWAY, WORKER, CLI, MODEL = sys.argv[1:5]








def load(addr):
    out = subprocess.run([CLI, "load", "--server", addr], capture_output=True, text=True, timeout=10).stdout
    vals = {}
    for part in out.split():
        if "=" in part:
            k, v = part.split("=", 1)
            vals[k] = v
    return int(vals["active"]), int(vals["queued"])


def metrics(base):
    values = {}
    for line in urllib.request.urlopen(base + "/metrics", timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            values[name] = float(v)
    return values


def main():
    tmp = tempfile.mkdtemp(prefix="gw-failover-")
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    hport = free_port()
    procs = {}
    try:
        for i, addr in enumerate(addrs):
            procs[addr] = subprocess.Popen(
                [WORKER, "--model", MODEL, "--backend", "cpu", "--threads", "1", "--listen", addr,
                 "--max-context", "2048", "--max-running", "1"],
                stdout=open(os.path.join(tmp, f"worker{i}.log"), "w"), stderr=subprocess.STDOUT)
        gw = subprocess.Popen([GATEWAY, "--workers", ",".join(addrs), "--listen", f"127.0.0.1:{free_port()}",
                               "--http-listen", f"127.0.0.1:{hport}"],
                              stdout=open(os.path.join(tmp, "gateway.log"), "w"), stderr=subprocess.STDOUT)
        procs["gateway"] = gw
        base = f"http://127.0.0.1:{hport}"
        wait_for("both workers ready", lambda: metrics(base)["tailorkv:gateway_workers_ready"] == 2, 120)
        # A request queued behind two streams waits for both before its first byte.
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120 * SLOWDOWN)

        # Spread: four short requests at once.
        def short(i):
            client.completions.create(model="m", prompt=f"Number {i}:", max_tokens=4, temperature=0)
        threads = [threading.Thread(target=short, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = metrics(base)
        per = [m[f'tailorkv:gateway_worker_requests_total{{worker="{a}"}}'] for a in addrs]
        check(per[0] >= 1 and per[1] >= 1 and sum(per) == 4, f"four requests spread over both workers {per}")

        # Four long streams: one running and one queued on each worker.
        results = {}

        def stream(i):
            t0 = time.time()
            try:
                n = 0
                for ev in client.chat.completions.create(
                        model="m", max_tokens=120, temperature=0, stream=True,
                        messages=[{"role": "user", "content": f"Tell a long story about lighthouse {i}."}]):
                    if ev.choices and ev.choices[0].delta.content:
                        n += 1
                results[i] = ("done", n, time.time() - t0)
            except openai.APIError as e:  # the stream's error event, or a failed request
                results[i] = ("error", str(e), time.time() - t0)
        streams = []
        for i in range(4):
            t = threading.Thread(target=stream, args=(i,))
            t.start()
            streams.append(t)
            time.sleep(0.3)
        wait_for("one running and one queued on each worker",
                 lambda: all(load(a) == (1, 1) for a in addrs), 20)
        victim = addrs[0]
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        t_kill = time.time()
        for t in streams:
            t.join(timeout=120 * SLOWDOWN)
        check(all(not t.is_alive() for t in streams), "no stream hangs after the kill")
        errors = [r for r in results.values() if r[0] == "error"]
        done = [r for r in results.values() if r[0] == "done"]
        print("results:", results, flush=True)
        check(len(errors) == 1 and len(done) == 3,
              "the running stream on the killed worker ended with an error; the other three completed")
        check(all(r[1] > 0 for r in done), "the completed streams carried text")
        m = metrics(base)
        check(m["tailorkv:gateway_retries_total"] >= 1, "the request queued on the killed worker was retried")
        check(m[f'tailorkv:gateway_worker_ready{{worker="{victim}"}}'] == 0 and
              m["tailorkv:gateway_workers_ready"] == 1, "the killed worker left the rotation")
        r = client.completions.create(model="m", prompt="After:", max_tokens=4, temperature=0)
        check(len(r.choices[0].text) > 0, "new requests complete on the remaining worker")
        print(f"PASS ({time.time() - t_kill:.1f} s from the kill to the end)", flush=True)
    finally:
        stop_all(list(procs.values()))
        if os.environ.get("GW_TEST_SHOW_LOGS"):
            for name in sorted(os.listdir(tmp)):
                print(f"--- {name}\n" + open(os.path.join(tmp, name)).read())


if __name__ == "__main__":
    main()
