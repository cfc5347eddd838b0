#!/usr/bin/env python3
"""Soak: the cluster under mixed load for a while; resources must stay flat
and every request must be accounted for (issue 18; RELIABILITY.md L4).

Starts kv-host (--warm-bytes 0: every arena goes back when its sessions
close), a gpu-worker attached to it with a hybrid plan whose sparse layers
keep their host KV in kv-host's arenas, and a gateway in front of the
worker. Then, for --minutes, runs at once (fixed seed for every choice):
  - gRPC clients (tailorkv-cli generate, straight to the worker or through
    the gateway's gRPC port), prompts of 5 to 600 words, greedy or sampled;
  - HTTP clients (POST /v1/completions and /v1/chat/completions on the
    gateway, streamed or not);
  - a disrupter: gRPC clients killed mid-stream (the client disconnects),
    and HTTP clients that send a streamed request and then read nothing
    for a while before closing (stalled readers: the worker cuts their
    generation off after --stream-stall-ms).
Every --sample-s seconds it records each process's RSS, open fds and
memfds, kv-host's arena bytes, reserved bytes and sessions (its metrics)
and the worker's running sequences.

Criteria (the run fails on any):
  - accounting: every request ends exactly once, as one of: completed (a
    final message / [DONE] / a whole JSON body), an error with a status
    (gRPC code or HTTP status), cancelled by us (a killed client) or a
    stalled reader we closed; none may hang past --request-timeout-s; and
    the worker's finished-request counters (stop + length) are at least
    the requests our clients saw complete and at most those plus the
    clients we killed or stalled (whose generation may have finished first);
  - flat resources: samples before --warmup-s are dropped; the rest are cut
    in thirds; for each process the last third's maximum RSS may exceed the
    first third's maximum by at most --rss-tolerance-pct percent plus
    --rss-slack-mib, and its maximum fd count the first third's by at most
    --fd-slack;
  - back to baseline after the load: within 60 s of the last request the
    worker runs nothing, kv-host holds 0 bytes and 0 sessions, and each
    process has no more fds than at its idle baseline (taken before the
    load, after one request of each kind) plus --fd-slack, and every
    started process is still alive.
Writes samples.csv, requests.csv and summary.json under --out; exit 0 when
every criterion holds, 1 otherwise, 2 for a bad command line or a cluster
that does not start.
"""
import argparse
import csv
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

WORDS = ("river mill town evening quiet lantern harbour storm garden letter winter bridge "
         "market candle orchard valley station silver window morning").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    values = {}
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            try:
                values[name] = float(v)
            except ValueError:
                pass
    return values


def proc_stats(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    fds = memfds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                memfds += 1
        except OSError:
            pass
    return rss, fds, memfds


class Cluster:
    def __init__(self, a, tmp):
        self.a, self.tmp = a, tmp
        self.procs = {}
        self.sock = os.path.join(tmp, "kv-host.sock")
        self.kv_metrics, self.w_metrics = free_port(), free_port()
        self.worker = f"127.0.0.1:{free_port()}"
        self.gw_grpc = f"127.0.0.1:{free_port()}"
        self.gw_http = free_port()

    def start(self, name, argv):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def wait_log(self, name, text, timeout_s):
        path = os.path.join(self.tmp, f"{name}.log")
        end = time.time() + timeout_s
        while time.time() < end:
            if text in open(path, errors="replace").read():
                return True
            if self.procs[name].poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def up(self):
        a = self.a
        self.start("kv-host", [a.kv_host, "--listen", f"unix:{self.sock}", "--budget", a.kv_budget,
                               "--warm-bytes", "0", "--metrics-listen", f"127.0.0.1:{self.kv_metrics}"])
        if not self.wait_log("kv-host", "ready on", 30):
            return "kv-host did not start"
        self.start("worker", [a.worker, "--model", a.model, "--backend", "cpu", "--threads", str(a.threads),
                              "--listen", self.worker, "--max-context", "2048", "--max-running", "4",
                              "--kv-plan", a.plan, "--kv-host", f"unix://{self.sock}",
                              "--stream-stall-ms", str(a.stream_stall_ms),
                              "--metrics-listen", f"127.0.0.1:{self.w_metrics}"])
        if not self.wait_log("worker", "ready on", 180):
            return "the worker did not start"
        self.start("gateway", [a.gateway, "--workers", self.worker, "--listen", self.gw_grpc,
                               "--http-listen", f"127.0.0.1:{self.gw_http}"])
        if not self.wait_log("gateway", "ready on", 30):
            return "the gateway did not start"
        end = time.time() + 30
        while time.time() < end:
            try:
                if scrape(self.gw_http).get("tailorkv:gateway_workers_ready") == 1:
                    return None
            except Exception:
                pass
            time.sleep(0.3)
        return "the gateway never saw the worker ready"

    def down(self):
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Ledger:
    """Every request, from the moment it is sent to its one outcome."""

    def __init__(self):
        self.mu = threading.Lock()
        self.rows = []

    def add(self, **row):
        with self.mu:
            row["id"] = len(self.rows)
            self.rows.append(row)


def prompt(rng):
    n = rng.choice([5, 12, 40, 120, 300, 600])
    return " ".join(rng.choice(WORDS) for _ in range(n)) + ". Tell me more.", n


def grpc_request(a, c, rng, ledger, kill_after=None):
    text, words = prompt(rng)
    max_tokens = rng.choice([8, 16, 32, 64])
    target = rng.choice([c.worker, c.gw_grpc])
    argv = [a.cli, "generate", "--server", target, "--raw", "--max-tokens", str(max_tokens),
            "--temperature", rng.choice(["0", "0.7"]), "--seed", str(rng.randrange(1 << 30)),
            "--timeout", str(a.request_timeout_s), "--prompt", text]
    t0 = time.time()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outcome, status, tokens = "", "", 0
    try:
        if kill_after is not None:
            try:
                out, _ = p.communicate(timeout=kill_after)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                outcome = "cancelled"
        else:
            out, _ = p.communicate(timeout=a.request_timeout_s + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        outcome = "hung"
    if not outcome:
        m = re.search(r"\[finish=(\w+).*?completion_tokens=(\d+)", out)
        if p.returncode == 0 and m:
            outcome, status, tokens = "completed", m.group(1), int(m.group(2))
        else:
            codes = re.findall(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                               r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                               r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED)\b", out)
            outcome, status = ("error", codes[0]) if codes else ("unaccounted", f"exit {p.returncode}: {out[-200:]!r}")
    ledger.add(kind="grpc-gateway" if target == c.gw_grpc else "grpc", words=words, max_tokens=max_tokens,
               outcome=outcome, status=status, tokens=tokens, seconds=round(time.time() - t0, 3))


def http_request(a, c, rng, ledger):
    text, words = prompt(rng)
    max_tokens = rng.choice([8, 16, 32, 64])
    chat = rng.random() < 0.5
    stream = rng.random() < 0.6
    body = {"model": "m", "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]),
            "seed": rng.randrange(1 << 30), "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.time()
    outcome, status, tokens = "unaccounted", "", 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", c.gw_http, timeout=a.request_timeout_s)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read().decode(errors="replace")
        conn.close()
        if r.status != 200:
            outcome, status = "error", f"HTTP {r.status}"
        elif stream:
            events = [l[6:] for l in data.splitlines() if l.startswith("data: ")]
            errs = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
            if errs:
                outcome, status = "error", json.loads(errs[0])["error"].get("code") or "stream error"
            elif events and events[-1] == "[DONE]":
                outcome, status = "completed", "stream"
                tokens = sum(1 for e in events[:-1] if json.loads(e).get("choices"))
        else:
            doc = json.loads(data)
            outcome, status = "completed", doc["choices"][0].get("finish_reason") or ""
            tokens = doc.get("usage", {}).get("completion_tokens", 0)
    except socket.timeout:
        outcome = "hung"
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        outcome, status = "unaccounted", repr(e)[:200]
    ledger.add(kind="http-chat" if chat else "http", words=words, max_tokens=max_tokens, outcome=outcome,
               status=status, tokens=tokens, seconds=round(time.time() - t0, 3))


def stalled_http(a, c, rng, ledger):
    """A streamed request whose reader stops: reads nothing for a while, then closes."""
    text, words = prompt(rng)
    t0 = time.time()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", c.gw_http))
    body = json.dumps({"model": "m", "prompt": text, "max_tokens": 1000 if words <= 300 else 400,
                       "temperature": 0.7, "seed": 1, "stream": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    time.sleep(a.stream_stall_ms / 1000 * 2.5)
    s.close()
    ledger.add(kind="http-stalled", words=words, max_tokens=0, outcome="stalled", status="closed by us",
               tokens=0, seconds=round(time.time() - t0, 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", required=True, help="the build tree (binaries under it)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--warmup-s", type=float, default=60)
    ap.add_argument("--grpc-clients", type=int, default=2)
    ap.add_argument("--http-clients", type=int, default=2)
    ap.add_argument("--disrupt-every-s", type=float, default=20, help="a killed or stalled client this often")
    ap.add_argument("--threads", type=int, default=1, help="the worker's CPU threads")
    ap.add_argument("--plan", default="hybrid:2:128:8:56:32:gpu:late:i8")
    ap.add_argument("--kv-budget", default="512M")
    ap.add_argument("--stream-stall-ms", type=int, default=3000)
    ap.add_argument("--request-timeout-s", type=int, default=180)
    ap.add_argument("--rss-tolerance-pct", type=float, default=10)
    ap.add_argument("--rss-slack-mib", type=float, default=16)
    ap.add_argument("--fd-slack", type=int, default=8)
    a = ap.parse_args()
    b = a.bin_dir
    a.worker, a.kv_host = f"{b}/gpu-worker/server/gpu-worker", f"{b}/kv-host/kv-host"
    a.gateway, a.cli = f"{b}/services/gateway/gateway", f"{b}/services/cli/tailorkv-cli"
    for f in (a.worker, a.kv_host, a.gateway, a.cli, a.model):
        if not os.path.exists(f):
            print(f"soak: missing {f}", file=sys.stderr)
            return 2
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="tkv-soak-")
    c = Cluster(a, tmp)
    ledger = Ledger()
    summary = {"command": " ".join(sys.argv), "minutes": a.minutes, "seed": a.seed, "plan": a.plan,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    failures = []
    try:
        err = c.up()
        if err:
            print(f"soak: {err}; logs in {tmp}", file=sys.stderr)
            return 2
        pids = {n: p.pid for n, p in c.procs.items()}
        rng0 = random.Random(a.seed)
        # One request of each kind before the idle baseline: lazily created
        # channels, threads and arenas exist from then on.
        grpc_request(a, c, random.Random(1), ledger)
        http_request(a, c, random.Random(2), ledger)
        time.sleep(2)
        baseline = {n: proc_stats(pid) for n, pid in pids.items()}
        summary["baseline"] = {n: {"rss": v[0], "fds": v[1], "memfds": v[2]} for n, v in baseline.items()}
        print(f"soak: cluster up (logs in {tmp}); baseline {summary['baseline']}", flush=True)

        stop = threading.Event()
        samples = []

        def sampler():
            t0 = time.time()
            while True:
                row = {"t": round(time.time() - t0, 1)}
                for n, pid in pids.items():
                    try:
                        row[f"{n}_rss"], row[f"{n}_fds"], row[f"{n}_memfds"] = proc_stats(pid)
                    except OSError:
                        row[f"{n}_rss"] = row[f"{n}_fds"] = row[f"{n}_memfds"] = -1
                try:
                    kv = scrape(c.kv_metrics)
                    row["kvhost_used_bytes"] = int(kv.get("tailorkv:kvhost_used_bytes", -1))
                    row["kvhost_reserved_bytes"] = int(kv.get("tailorkv:kvhost_reserved_bytes", -1))
                    row["kvhost_sessions"] = int(kv.get("tailorkv:kvhost_sessions", -1))
                    row["kvhost_arenas"] = int(kv.get("tailorkv:kvhost_arenas", -1))
                    w = scrape(c.w_metrics)
                    row["worker_sequences"] = int(w.get("tailorkv:kv_sequences", -1))
                    row["worker_running"] = int(w.get("tailorkv:num_requests_running", -1))
                except Exception:
                    pass
                row["requests"] = len(ledger.rows)
                samples.append(row)
                if stop.wait(a.sample_s):
                    return

        def client(kind, seed):
            rng = random.Random(seed)
            while not stop.is_set():
                (grpc_request if kind == "grpc" else http_request)(a, c, rng, ledger)

        def disrupter(seed):
            rng = random.Random(seed)
            while not stop.wait(a.disrupt_every_s):
                if rng.random() < 0.5:
                    grpc_request(a, c, rng, ledger, kill_after=rng.uniform(0.5, 4))
                else:
                    stalled_http(a, c, rng, ledger)

        threads = [threading.Thread(target=sampler)]
        threads += [threading.Thread(target=client, args=("grpc", rng0.randrange(1 << 30))) for _ in range(a.grpc_clients)]
        threads += [threading.Thread(target=client, args=("http", rng0.randrange(1 << 30))) for _ in range(a.http_clients)]
        threads += [threading.Thread(target=disrupter, args=(rng0.randrange(1 << 30),))]
        t_start = time.time()
        for t in threads:
            t.start()
        while time.time() - t_start < a.minutes * 60:
            time.sleep(1)
            dead = [n for n, p in c.procs.items() if p.poll() is not None]
            if dead:
                failures.append(f"process exited during the load: {dead}")
                break
        stop.set()
        for t in threads[1:]:
            t.join(timeout=a.request_timeout_s + 60)
        if any(t.is_alive() for t in threads[1:]):
            failures.append("a client thread did not finish within the request timeout")
        threads[0].join()
        load_s = time.time() - t_start

        # Back to baseline.
        settled = None
        end = time.time() + 60
        while time.time() < end:
            w, kv = scrape(c.w_metrics), scrape(c.kv_metrics)
            settled = {"worker_running": w.get("tailorkv:num_requests_running"),
                       "worker_waiting": w.get("tailorkv:num_requests_waiting"),
                       "worker_sequences": w.get("tailorkv:kv_sequences"),
                       "kvhost_used_bytes": kv.get("tailorkv:kvhost_used_bytes"),
                       "kvhost_reserved_bytes": kv.get("tailorkv:kvhost_reserved_bytes"),
                       "kvhost_sessions": kv.get("tailorkv:kvhost_sessions")}
            if all(v == 0 for v in settled.values()):
                break
            time.sleep(1)
        summary["after_load"] = settled
        if not settled or any(v != 0 for v in settled.values()):
            failures.append(f"not back to idle 60 s after the load: {settled}")
        time.sleep(2)
        final = {}
        for n, pid in pids.items():
            if c.procs[n].poll() is not None:
                failures.append(f"{n} is not running after the load")
                continue
            final[n] = proc_stats(pid)
            if final[n][1] > baseline[n][1] + a.fd_slack:
                failures.append(f"{n}: {final[n][1]} fds after the load, {baseline[n][1]} at the idle baseline")
        summary["final"] = {n: {"rss": v[0], "fds": v[1], "memfds": v[2]} for n, v in final.items()}

        # Flat resources: first third vs last third after the warm-up.
        kept = [s for s in samples if s["t"] >= a.warmup_s]
        trend = {}
        if len(kept) < 6:
            failures.append(f"only {len(kept)} samples after the warm-up: run longer")
        else:
            third = len(kept) // 3
            first, last = kept[:third], kept[-third:]
            for n in pids:
                r1 = max(s[f"{n}_rss"] for s in first)
                r3 = max(s[f"{n}_rss"] for s in last)
                f1 = max(s[f"{n}_fds"] for s in first)
                f3 = max(s[f"{n}_fds"] for s in last)
                m1 = max(s[f"{n}_memfds"] for s in first)
                m3 = max(s[f"{n}_memfds"] for s in last)
                allowed = r1 * (1 + a.rss_tolerance_pct / 100) + a.rss_slack_mib * 2**20
                trend[n] = {"rss_first_max": r1, "rss_last_max": r3, "rss_growth_pct": round(100 * (r3 - r1) / r1, 2),
                            "fds_first_max": f1, "fds_last_max": f3, "memfds_first_max": m1, "memfds_last_max": m3}
                if r3 > allowed:
                    failures.append(f"{n}: RSS grew from {r1 / 2**20:.1f} MiB to {r3 / 2**20:.1f} MiB "
                                    f"(allowed {allowed / 2**20:.1f})")
                if f3 > f1 + a.fd_slack:
                    failures.append(f"{n}: fds grew from {f1} to {f3}")
            for key in ("kvhost_used_bytes", "kvhost_sessions"):
                v1 = max(s.get(key, 0) for s in first)
                v3 = max(s.get(key, 0) for s in last)
                trend[key] = {"first_max": v1, "last_max": v3}
        summary["trend"] = trend

        # Accounting.
        rows = ledger.rows
        by = {}
        for r in rows:
            by.setdefault(r["outcome"], 0)
            by[r["outcome"]] += 1
        statuses = {}
        for r in rows:
            if r["outcome"] == "error":
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        completed = by.get("completed", 0)
        w = scrape(c.w_metrics)
        worker_done = int(sum(w.get(f'tailorkv:request_success_total{{finished_reason="{r}"}}', 0)
                              for r in ("stop", "length")))
        summary["requests"] = {"sent": len(rows), "by_outcome": by, "errors_by_status": statuses,
                               "tokens": sum(r["tokens"] for r in rows),
                               "by_kind": {k: sum(1 for r in rows if r["kind"] == k)
                                           for k in sorted({r["kind"] for r in rows})},
                               "worker_finished_stop_or_length": worker_done,
                               "worker_finished_abort": int(w.get('tailorkv:request_success_total{finished_reason="abort"}', 0)),
                               "worker_failed": int(w.get("tailorkv:request_failure_total", 0))}
        summary["load_seconds"] = round(load_s, 1)
        for bad in ("hung", "unaccounted"):
            if by.get(bad):
                failures.append(f"{by[bad]} requests {bad}: " +
                                "; ".join(f"{r['kind']} {r['status']}" for r in rows if r["outcome"] == bad)[:600])
        # A killed or stalled client's generation may still finish at the
        # worker (it ran out before the client left); nothing else may.
        disrupted = by.get("cancelled", 0) + by.get("stalled", 0)
        if not completed <= worker_done <= completed + disrupted:
            failures.append(f"the worker finished {worker_done} requests (stop or length); our clients saw "
                            f"{completed} complete and disrupted {disrupted}")
        if completed == 0:
            failures.append("no request completed")
        with open(os.path.join(a.out, "samples.csv"), "w", newline="") as f:
            keys = sorted({k for s in samples for k in s}, key=lambda k: (k != "t", k))
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(samples)
        with open(os.path.join(a.out, "requests.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["id", "kind", "words", "max_tokens", "outcome", "status", "tokens", "seconds"])
            wr.writeheader()
            wr.writerows(rows)
    finally:
        c.down()
        for n, p in c.procs.items():
            summary.setdefault("exit_codes", {})[n] = p.returncode
        if any(code not in (0, None) for code in summary.get("exit_codes", {}).values()):
            failures.append(f"a process did not stop cleanly on SIGTERM: {summary['exit_codes']}")
    summary["failures"] = failures
    summary["pass"] = not failures
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    print("soak: PASS" if not failures else "soak: FAIL\n  " + "\n  ".join(failures), flush=True)
    if not failures:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"soak: logs kept in {tmp}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
