"""A real Prometheus server scrapes the gateway, a gpu-worker and kv-host (issue 15).

Starts kv-host, a gpu-worker attached to it (CPU backend, SmolLM2, a hybrid
plan so that the host tier is used) and the gateway, each with its metrics
endpoint; Debian's Prometheus (the package's binary, unpacked into the build
tree with `apt-get download` + `dpkg -x`, so nothing is installed or started
system-wide) scrapes the three every second. After a few requests through
the gateway, PromQL over the scraped data must return: every target up, the
TTFT histogram's median on the worker and on the gateway, and the KV gauges
(the worker's KV bytes per policy and tier, kv-host's budget and use).

Usage: prometheus_scrape_test.py GATEWAY WORKER CLI MODEL KVHOST PROM_DIR PROFILER
"""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from proc_test_util import check, free_port, stop_all, wait_for

GATEWAY, WORKER, CLI, MODEL, KVHOST, PROM_DIR, PROFILER = sys.argv[1:8]






def prometheus_binary():
    found = shutil.which("prometheus")
    if found:
        return found
    local = os.path.join(PROM_DIR, "usr", "bin", "prometheus")
    if not os.path.exists(local):
        os.makedirs(PROM_DIR, exist_ok=True)
        got = subprocess.run(["apt-get", "download", "prometheus"], cwd=PROM_DIR,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if got.returncode != 0:  # no package lists yet on this machine
            subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "download", "prometheus"], cwd=PROM_DIR, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = glob.glob(os.path.join(PROM_DIR, "prometheus_*.deb"))[0]
        subprocess.run(["dpkg", "-x", deb, PROM_DIR], check=True)
    return local


def query(prom, q):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    if body.get("status") != "success":
        raise RuntimeError(body)
    return body["data"]["result"]




def main():
    tmp = tempfile.mkdtemp(prefix="prom-test-", dir="/tmp")
    sock = os.path.join(tmp, "kv.sock")
    ports = {k: free_port() for k in ("kvm", "worker", "wm", "gw", "http", "prom", "prof", "profm")}
    procs = []

    def start(name, args):
        procs.append(subprocess.Popen(args, stdout=open(os.path.join(tmp, name + ".log"), "w"),
                                      stderr=subprocess.STDOUT))

    try:
        prom_bin = prometheus_binary()
        start("kv-host", [KVHOST, "--listen", f"unix:{sock}", "--budget", "1G",
                          "--metrics-listen", f"127.0.0.1:{ports['kvm']}"])
        time.sleep(0.5)
        waddr = f"127.0.0.1:{ports['worker']}"
        start("worker", [WORKER, "--model", MODEL, "--backend", "cpu", "--threads", "2", "--listen", waddr,
                         "--max-context", "2048", "--kv-host", f"unix://{sock}",
                         "--kv-plan", "hybrid:2:64:8:8:16:gpu", "--metrics-listen", f"127.0.0.1:{ports['wm']}"])
        start("profiler", [PROFILER, "--listen", f"127.0.0.1:{ports['prof']}", "--models-dir",
                           os.path.dirname(os.path.abspath(MODEL)), "--plans-dir", os.path.join(tmp, "plans"),
                           "--metrics-listen", f"127.0.0.1:{ports['profm']}"])
        start("gateway", [GATEWAY, "--workers", waddr, "--listen", f"127.0.0.1:{ports['gw']}",
                          "--http-listen", f"127.0.0.1:{ports['http']}"])
        base = f"http://127.0.0.1:{ports['http']}"
        wait_for("gateway healthy", lambda: urllib.request.urlopen(base + "/health", timeout=2).status == 200, 120)
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n")
            for job, port in (("gateway", ports["http"]), ("worker", ports["wm"]), ("kv-host", ports["kvm"]),
                              ("profiler", ports["profm"])):
                f.write(f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        start("prometheus", [prom_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/tsdb",
                             f"--web.listen-address=127.0.0.1:{ports['prom']}"])
        prom = f"http://127.0.0.1:{ports['prom']}"
        wait_for("Prometheus ready", lambda: urllib.request.urlopen(prom + "/-/ready", timeout=2).status == 200, 60)

        for i in range(3):
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"Count to {i + 3}."}],
                               "max_tokens": 12, "temperature": 0}).encode()
            req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            check(urllib.request.urlopen(req, timeout=120).status == 200, f"request {i} through the gateway")

        wait_for("all four targets up",
                 lambda: len([r for r in query(prom, "up == 1")]) == 4, 30)
        check(True, "Prometheus scrapes gateway, worker, kv-host and profiler (up == 1)")
        wait_for("the worker's requests scraped",
                 lambda: float(query(prom, 'tailorkv:time_to_first_token_seconds_count{job="worker"}')[0]["value"][1])
                 >= 3, 30)
        wait_for("the gateway's requests scraped",
                 lambda: float(query(prom, 'tailorkv:time_to_first_token_seconds_count{job="gateway"}')[0]["value"][1])
                 >= 3, 30)
        for job in ("worker", "gateway"):
            q = f'histogram_quantile(0.5, sum by (le) (tailorkv:time_to_first_token_seconds_bucket{{job="{job}"}}))'
            res = query(prom, q)
            v = float(res[0]["value"][1]) if res else float("nan")
            check(not math.isnan(v) and v > 0, f"PromQL median TTFT on the {job}: {v * 1000:.0f} ms ({q})")
        kv = query(prom, 'tailorkv:kv_cache_bytes{job="worker"}')
        policies = sorted({(r["metric"]["policy"], r["metric"]["tier"]) for r in kv})
        check(("sparse", "host") in policies and ("quant", "device") in policies,
              f"the worker's KV gauges per policy and tier: {policies}")
        budget = float(query(prom, 'tailorkv:kvhost_budget_bytes')[0]["value"][1])
        used = float(query(prom, 'tailorkv:kvhost_used_bytes')[0]["value"][1])
        check(budget == float(1 << 30) and used > 0, f"kv-host's budget {budget:.0f} and use {used:.0f} bytes")
        prof = query(prom, 'tailorkv:profiler_plans{job="profiler"}')
        check(len(prof) == 1 and float(prof[0]["value"][1]) == 0, "the profiler's plan count (an empty store)")
        plan = query(prom, 'tailorkv:kv_plan_info')
        check(len(plan) == 1 and "sparse" in plan[0]["metric"]["summary"] and
              plan[0]["metric"]["plan_id"].startswith("p") and len(plan[0]["metric"]["plan_id"]) == 21,
              f"the plan in use as an info series (plan_id {plan[0]['metric'].get('plan_id')})")
        print("PASS", flush=True)
    finally:
        stop_all(procs)
        if os.environ.get("GW_TEST_SHOW_LOGS"):
            for name in sorted(glob.glob(os.path.join(tmp, "*.log"))):
                print(f"--- {name}\n" + open(name).read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
