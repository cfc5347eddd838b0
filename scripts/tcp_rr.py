import socket, sys, time, threading, statistics
host, port = sys.argv[1], int(sys.argv[2]); mode = sys.argv[3]
sizes = [73728, 196608, 524288, 2097152, 3670016]
if mode == 'server':
    bufs = {n: bytes(n) for n in sizes}
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        h = c.recv(8)
        if not h: break
        n = int.from_bytes(h, 'little'); c.sendall(bufs[n])
else:
    c = socket.create_connection((host, port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(max(sizes)); mv = memoryview(buf)
    for n in sizes:
        ts = []
        for i in range(105):
            t0 = time.perf_counter(); c.sendall(n.to_bytes(8, 'little')); got = 0
            while got < n: got += c.recv_into(mv[got:n])
            if i >= 5: ts.append((time.perf_counter() - t0) * 1e6)
        p50 = statistics.median(ts); print(f"{n:10d} B  p50 {p50:9.1f} us  {n/p50:7.0f} MB/s")
