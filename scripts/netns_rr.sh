set -e
rate="$1"; tag="$2"
w=rrw$$; n=rrn$$
ip netns add $w; ip netns add $n
ip link add v$w type veth peer name v$n; ip link set v$w netns $w; ip link set v$n netns $n
ip -n $w addr add 10.88.0.2/24 dev v$w; ip -n $n addr add 10.88.0.1/24 dev v$n
for ns in $w $n; do ip -n $ns link set lo up; ip -n $ns link set v$ns up; done
if [ -n "$rate" ]; then for ns in $w $n; do ip netns exec $ns tc qdisc add dev v$ns root tbf rate $rate burst 1mb latency 100ms; done; fi
ip netns exec $n build/kv-host/kv-host --listen unix:/tmp/kvn$$.sock --budget 2G --data-listen 10.88.0.1:50680 --data-token tt > /tmp/kvn.log 2>&1 &
kp=$!
ip netns exec $n python3 /tmp/tcp_rr.py 10.88.0.1 50690 server &
pp=$!
sleep 1
echo "== grpc $tag"; ip netns exec $w build/bench/tkv_remote_rows_bench --target 10.88.0.1:50680 --token tt --heads 8 --row-bytes 256 --rows 48,128,512,896 --requests 100 --out /tmp/rr/netns_${tag}_8b.json
ip netns exec $w build/bench/tkv_remote_rows_bench --target 10.88.0.1:50680 --token tt --heads 3 --row-bytes 256 --rows 48 --requests 200 --out /tmp/rr/netns_${tag}_smollm2.json | tail -1
echo "== raw tcp $tag"; ip netns exec $w python3 /tmp/tcp_rr.py 10.88.0.1 50690 client
kill $kp $pp 2>/dev/null || true; wait $kp $pp 2>/dev/null || true
ip netns del $w; ip netns del $n
