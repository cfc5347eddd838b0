"""Helpers shared by the process tests written in Python (gateway, Prometheus):
free ports, polling with a deadline, checks that print what passed, and
stopping child processes (SIGTERM, then SIGKILL after 15 s)."""
import os
import socket
import subprocess
import time


# Time bounds stretch this many times in sanitizer builds, where every process
# runs several times slower: ctest sets TAILORKV_TEST_SLOWDOWN there
# (cmake/tailorkv.cmake), the same factor as the C++ tests' kSanitizerSlowdown.
SLOWDOWN = int(os.environ.get("TAILORKV_TEST_SLOWDOWN", "1"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout_s, interval_s=0.2):
    """Polls cond() (exceptions count as not yet) until true; fails the test after
    timeout_s (times SLOWDOWN)."""
    timeout_s *= SLOWDOWN
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval_s)
    raise SystemExit(f"FAIL: {what} not within {timeout_s} s" + (f" ({last})" if last else ""))


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}", flush=True)


def stop_all(procs):
    for p in reversed(list(procs)):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
