#!/usr/bin/env python3
"""Runs a command and samples its /proc/PID/status every 20 ms: prints the
peaks of VmRSS, RssAnon, RssFile (and RssFile when RssAnon peaked) and the
final VmHWM (kB). Usage: sample_rss.py OUT.tsv -- COMMAND..."""
import subprocess
import sys
import time

out_path, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
p = subprocess.Popen(cmd)
keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmSize")
peak = dict.fromkeys(keys, 0)
file_at_anon_peak = 0
t0 = time.monotonic()
with open(out_path, "w") as out:
    out.write("t_s\t" + "\t".join(keys) + "\n")
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                s = {l.split(":")[0]: int(l.split()[1]) for l in f if l.split(":")[0] in keys}
        except (OSError, ValueError, IndexError):
            break
        if len(s) == len(keys):
            if s["RssAnon"] > peak["RssAnon"]:
                file_at_anon_peak = s["RssFile"]
            for k in keys:
                peak[k] = max(peak[k], s[k])
            out.write(f"{time.monotonic() - t0:.2f}\t" + "\t".join(str(s[k]) for k in keys) + "\n")
        time.sleep(0.02)
rc = p.wait()
print(f"rc {rc}; peaks (kB): " + ", ".join(f"{k} {peak[k]}" for k in keys)
      + f"; RssFile at the RssAnon peak {file_at_anon_peak}", file=sys.stderr)
sys.exit(rc)
