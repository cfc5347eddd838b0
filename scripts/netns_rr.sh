#!/usr/bin/env bash
# The remote data plane's request cost across two network namespaces (a
# veth pair, optional tbf rate): tkv_remote_rows_bench against kv-host with
# the rows channel and with it off (gRPC streams), and a raw-TCP
# request/response baseline (scripts/tcp_rr.py). Needs root; from the repo root.
# Usage: scripts/netns_rr.sh RATE|"" TAG   (JSON to /tmp/rr)
set -e
rate="$1"; tag="$2"
mkdir -p /tmp/rr
w=rrw$$; n=rrn$$
ip netns add $w; ip netns add $n
ip link add v$w type veth peer name v$n; ip link set v$w netns $w; ip link set v$n netns $n
ip -n $w addr add 10.88.0.2/24 dev v$w; ip -n $n addr add 10.88.0.1/24 dev v$n
for ns in $w $n; do ip -n $ns link set lo up; ip -n $ns link set v$ns up; done
if [ -n "$rate" ]; then for ns in $w $n; do ip netns exec $ns tc qdisc add dev v$ns root tbf rate $rate burst 1mb latency 100ms; done; fi
ip netns exec $n python3 scripts/tcp_rr.py 10.88.0.1 50690 server &
pp=$!
for transport in rows grpc; do
  extra=""; [ $transport = grpc ] && extra="--rows-listen off"
  ip netns exec $n build/kv-host/kv-host --listen unix:/tmp/kvn$$.sock --budget 2G --data-listen 10.88.0.1:50680 --data-token tt $extra > /tmp/kvn.log 2>&1 &
  kp=$!
  sleep 1
  echo "== $transport $tag"
  ip netns exec $w build/bench/tkv_remote_rows_bench --target 10.88.0.1:50680 --token tt --heads 8 --row-bytes 256 --rows 48,128,512,896 --requests 100 --out /tmp/rr/netns_${tag}_${transport}_8b.json
  ip netns exec $w build/bench/tkv_remote_rows_bench --target 10.88.0.1:50680 --token tt --heads 3 --row-bytes 256 --rows 48 --requests 200 --out /tmp/rr/netns_${tag}_${transport}_smollm2.json | tail -1
  kill $kp; wait $kp 2>/dev/null || true
done
echo "== raw tcp $tag"; ip netns exec $w python3 scripts/tcp_rr.py 10.88.0.1 50690 client
kill $pp 2>/dev/null || true; wait $pp 2>/dev/null || true
ip netns del $w; ip netns del $n
