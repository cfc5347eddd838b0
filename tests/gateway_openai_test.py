"""The gateway driven by the official `openai` Python package (issue 15).

Starts a real gpu-worker (CPU backend, SmolLM2) and a real gateway in front of
it with an API key, then: models list; chat and completions, streaming and
not (greedy: the streamed text equals the whole one); usage in the response
and in the last stream event; stop strings; bad requests (OpenAI error
objects, 4xx, `param` naming the field); a wrong key (401); a client that
disconnects mid-stream (the worker's generation is aborted: its GetLoad
shows no active request long before the generation could have finished);
the gateway's /metrics. Exits non-zero on the first failed check.

Usage: gateway_openai_test.py GATEWAY WORKER CLI MODEL
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

from proc_test_util import check, free_port, stop_all, wait_for

GATEWAY, WORKER, CLI, MODEL = sys.argv[1:5]
KEY = "test-key-123"








def worker_active(addr):
    out = subprocess.run([CLI, "load", "--server", addr], capture_output=True, text=True, timeout=10).stdout
    for part in out.split():
        if part.startswith("active="):
            return int(part.split("=")[1])
    raise RuntimeError(out)


def main():
    tmp = tempfile.mkdtemp(prefix="gw-test-")
    wport, gport, hport = free_port(), free_port(), free_port()
    waddr = f"127.0.0.1:{wport}"
    procs = []
    try:
        wlog = open(os.path.join(tmp, "worker.log"), "w")
        procs.append(subprocess.Popen([WORKER, "--model", MODEL, "--backend", "cpu", "--threads", "2",
                                       "--listen", waddr, "--max-context", "2048"],
                                      stdout=wlog, stderr=subprocess.STDOUT))
        glog = open(os.path.join(tmp, "gateway.log"), "w")
        procs.append(subprocess.Popen([GATEWAY, "--workers", waddr, "--listen", f"127.0.0.1:{gport}",
                                       "--http-listen", f"127.0.0.1:{hport}", "--api-key", KEY,
                                       "--max-tokens-cap", "512"],
                                      stdout=glog, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{hport}"
        wait_for("gateway /health 200",
                 lambda: urllib.request.urlopen(base + "/health", timeout=2).status == 200, 120)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)

        models = client.models.list()
        check(len(models.data) == 1 and models.data[0].id.startswith("SmolLM2"),
              f"models.list names the model ({models.data[0].id})")

        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
        text = whole.choices[0].message.content
        check("Paris" in text, f"chat answers ({text!r})")
        check(whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0, "chat usage")
        check(whole.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")

        stream = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        parts, usage, finish = [], None, None
        for ev in stream:
            if ev.usage is not None:
                usage = ev.usage
            for ch in ev.choices:
                if ch.delta.content:
                    parts.append(ch.delta.content)
                if ch.finish_reason:
                    finish = ch.finish_reason
        check("".join(parts) == text, "streamed chat text equals the whole response (greedy)")
        check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens,
              "usage in the last stream event")
        check(finish == whole.choices[0].finish_reason, "stream finish_reason")

        comp = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=0)
        ctext = comp.choices[0].text
        sparts = [ev.choices[0].text for ev in client.completions.create(
            model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True) if ev.choices]
        check(len(ctext) > 0 and "".join(sparts) == ctext, f"completions, streamed and whole ({ctext!r})")

        # A stop string taken from the greedy text: the answer ends before it.
        words = ctext.split()
        stop = " " + words[2]
        cut = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=0,
                                        stop=[stop])
        check(cut.choices[0].text == ctext[:ctext.index(stop)] and cut.choices[0].finish_reason == "stop",
              f"stop string {stop!r} ends the text ({cut.choices[0].text!r})")

        for kwargs, param in (({"temperature": 7}, "temperature"), ({"n": 2}, "n"), ({"max_tokens": 100000},
                                                                                    "max_tokens")):
            try:
                client.chat.completions.create(model="smollm2", messages=msgs, **kwargs)
                raise SystemExit(f"FAIL: {kwargs} was accepted")
            except openai.BadRequestError as e:
                err = e.body if isinstance(e.body, dict) else {}
                check(e.status_code == 400 and err.get("param") == param and err.get("type") ==
                      "invalid_request_error", f"bad {param}: 400 with an error object naming it")
        try:
            client.chat.completions.create(model="smollm2", messages=[], max_tokens=4)
            raise SystemExit("FAIL: empty messages accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400, "empty messages: 400")
        try:
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
            raise SystemExit("FAIL: a wrong key was accepted")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "a wrong API key: 401")

        # A client that goes away mid-stream: 400 tokens would take ~12 s on
        # this CPU; the worker must be idle again within 3 s of the close.
        long_stream = client.chat.completions.create(
            model="smollm2", max_tokens=400, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Write a very long story about a lighthouse keeper."}])
        got = 0
        for ev in long_stream:
            if ev.choices and ev.choices[0].delta.content:
                got += 1
            if got >= 3:
                break
        check(worker_active(waddr) == 1, "the long generation runs on the worker")
        t_close = time.time()
        long_stream.close()
        wait_for("the worker's generation aborted after the client left", lambda: worker_active(waddr) == 0, 3)
        print(f"ok: worker idle {time.time() - t_close:.2f} s after the client closed its stream", flush=True)

        # TLS end to end: a second worker and a second gateway with a
        # self-signed certificate (gRPC and HTTP ports TLS only), the gateway
        # reaching the worker over TLS; the client trusts the certificate,
        # a plain-HTTP or plain-gRPC client gets nothing.
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        sport, sgport, tls_waddr = free_port(), free_port(), f"127.0.0.1:{free_port()}"
        procs.append(subprocess.Popen([WORKER, "--model", MODEL, "--backend", "cpu", "--threads", "1", "--listen",
                                       tls_waddr, "--max-context", "2048", "--tls-cert", cert, "--tls-key", key],
                                      stdout=open(os.path.join(tmp, "worker-tls.log"), "w"),
                                      stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([GATEWAY, "--workers", tls_waddr, "--workers-tls-ca", cert,
                                       "--listen", f"127.0.0.1:{sgport}",
                                       "--http-listen", f"127.0.0.1:{sport}", "--tls-cert", cert, "--tls-key", key],
                                      stdout=open(os.path.join(tmp, "gateway-tls.log"), "w"),
                                      stderr=subprocess.STDOUT))
        tls_client = openai.OpenAI(base_url=f"https://127.0.0.1:{sport}/v1", api_key="none", max_retries=0,
                                   http_client=openai.DefaultHttpxClient(verify=cert, timeout=60))
        # The model's name is known once the worker behind it answered.
        wait_for("HTTPS gateway with a ready worker", lambda: tls_client.models.list().data[0].id.startswith("SmolLM2"),
                 120)
        tls_text = tls_client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24,
                                                      temperature=0).choices[0].message.content
        check(tls_text == text, "HTTPS to the gateway, TLS from it to the worker: the same answer")
        out = subprocess.run([CLI, "generate", "--server", f"127.0.0.1:{sgport}", "--tls-ca", cert, "--chat",
                              "--max-tokens", "24", "--temperature", "0", "--prompt", "What is the capital of France?"],
                             capture_output=True, text=True, timeout=120)
        check(out.returncode == 0 and out.stdout.strip() == text, "gRPC over TLS through the gateway")
        out = subprocess.run([CLI, "generate", "--server", f"127.0.0.1:{sgport}", "--timeout", "5", "--prompt", "x"],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode != 0, "plain gRPC is refused on the TLS port")
        load = subprocess.run([CLI, "load", "--server", f"127.0.0.1:{sgport}", "--tls-ca", cert],
                              capture_output=True, text=True, timeout=10)
        check(load.returncode == 0 and "active=0" in load.stdout, "gRPC GetLoad through the gateway (summed)")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{sport}/health", timeout=5)
            raise SystemExit("FAIL: plain HTTP was answered on the TLS port")
        except SystemExit:
            raise
        except Exception:
            check(True, "plain HTTP gets no answer on the TLS port")

        # The same service over gRPC on the gateway's --listen address.
        gaddr = f"127.0.0.1:{gport}"
        out = subprocess.run([CLI, "generate", "--server", gaddr, "--api-key", KEY, "--chat", "--max-tokens", "24",
                              "--temperature", "0", "--prompt", "What is the capital of France?"],
                             capture_output=True, text=True, timeout=120)
        check(out.returncode == 0 and out.stdout.strip() == text,
              f"gRPC Generate through the gateway gives the same answer ({out.stdout.strip()!r})")
        out = subprocess.run([CLI, "generate", "--http", base, "--api-key", KEY, "--chat", "--max-tokens", "24",
                              "--prompt", "What is the capital of France?"], capture_output=True, text=True, timeout=120)
        check(out.returncode == 0 and out.stdout.strip() == text and "completion_tokens" in out.stderr,
              "tailorkv-cli generate --http through the gateway: the same answer")
        out = subprocess.run([CLI, "generate", "--http", f"https://127.0.0.1:{sport}", "--tls-ca", cert, "--chat",
                              "--max-tokens", "24", "--prompt", "What is the capital of France?"],
                             capture_output=True, text=True, timeout=120)
        check(out.returncode == 0 and out.stdout.strip() == text, "tailorkv-cli generate --http over HTTPS")
        out = subprocess.run([CLI, "generate", "--http", base, "--api-key", KEY, "--prompt", "x", "--temperature", "9"],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode == 1 and "temperature" in out.stderr, f"--http shows the error object ({out.stderr.strip()})")
        nokey = subprocess.run([CLI, "generate", "--server", gaddr, "--prompt", "x", "--max-tokens", "2"],
                               capture_output=True, text=True, timeout=60)
        check(nokey.returncode != 0 and "UNAUTHENTICATED" in (nokey.stdout + nokey.stderr).upper(),
              "gRPC without the key: UNAUTHENTICATED")

        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        values = {}
        for line in metrics.splitlines():
            if line and not line.startswith("#"):
                name, _, v = line.rpartition(" ")
                values[name] = float(v)
        check(values.get("tailorkv:time_to_first_token_seconds_count", 0) >= 6, "TTFT histogram in /metrics")
        check(values.get("tailorkv:client_disconnects_total") == 1, "the disconnect is counted")
        check(values.get('tailorkv:request_errors_total{status="400"}', 0) >= 4, "bad requests are counted")
        check(values.get("tailorkv:gateway_workers_ready") == 1, "workers ready gauge")
        print("PASS", flush=True)
    finally:
        stop_all(procs)
        for name in ("gateway.log", "worker.log"):
            path = os.path.join(tmp, name)
            if os.path.exists(path) and os.environ.get("GW_TEST_SHOW_LOGS"):
                print(f"--- {name}\n" + open(path).read())


if __name__ == "__main__":
    main()
