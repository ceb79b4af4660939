#!/usr/bin/env bash
# Scale-out: N = 1, 2, 4, 8 nodes load one model at once from an origin whose
# bandwidth tc limits, with the peer group and without it. Each node is a
# network namespace made here; the bridge lives in a namespace of its own, so
# no address of this test is routed from the host's namespace. Prints the time
# for all N nodes to finish and the origin bytes, per N.
# Usage: bench/group.sh [--size 512MiB] [--rate 800mbit] [--nodes "1 2 4 8"]
set -euo pipefail
cd "$(dirname "$0")/.."
size=512MiB rate=800mbit counts="1 2 4 8"
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --nodes) counts=$2; shift 2 ;;
    *) echo "usage: $0 [--size 512MiB] [--rate 800mbit] [--nodes \"1 2 4 8\"]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q
bin=$PWD/target/release/modelfs
work=$(mktemp -d /var/tmp/modelfs-bench-group.XXXXXX)
tag=mfs$$
max=8
nsname() { echo "$tag-$1"; }
cleanup() {
  for ns in $(ip netns list | awk '{print $1}' | grep "^$tag-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work" /dev/shm/"$tag"-*
}
trap cleanup EXIT

# The switch, the origin and the nodes.
ip netns add "$(nsname sw)"
ip netns exec "$(nsname sw)" ip link add br0 type bridge
ip netns exec "$(nsname sw)" ip link set br0 up
attach() { # NAME ADDRESS
  local ns; ns=$(nsname "$1")
  ip netns add "$ns"
  ip link add "v$tag$1" type veth peer name eth0 netns "$ns"
  ip link set "v$tag$1" netns "$(nsname sw)"
  ip netns exec "$(nsname sw)" ip link set "v$tag$1" master br0 up
  ip netns exec "$ns" ip addr add "$2/24" dev eth0
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip link set lo up
}
attach origin 10.213.0.1
for i in $(seq 1 $max); do attach "n$i" "10.213.0.$((10 + i))"; done
# The origin sends at most $rate, to all nodes together.
ip netns exec "$(nsname origin)" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 100ms

env_out=$(GARAGE_BIND=0.0.0.0 ip netns exec "$(nsname origin)" scripts/garage.sh start "$work/garage")
eval "$(echo "$env_out" | sed 's/^/export /')"
local_ep=${S3_ENDPOINT/0.0.0.0/127.0.0.1}
origin_ep=${S3_ENDPOINT/0.0.0.0/10.213.0.1}
"$bin" synth "$work/model" --size "$size" --files 4 >/dev/null
ip netns exec "$(nsname origin)" "$bin" push "$work/model" s3://models/bench --endpoint "$local_ep" >/dev/null
bytes=$(cat "$work"/model/*.safetensors | wc -c)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"

# One node: mount, load every shard at once, verify, report, unmount.
cat > "$work/node.sh" <<'NODE'
#!/usr/bin/env bash
set -euo pipefail
bin=$1 i=$2 peers=$3 work=$4 ep=$5 out=$6
mp=$work/mnt-$i; mkdir -p "$mp"
cache=/dev/shm/$(basename "$work")-$i; rm -rf "$cache"
args=(--endpoint "$ep" --cache-dir "$cache" --cache-size 4GiB)
if [ -n "$peers" ]; then args+=(--listen "10.213.0.$((10 + i)):7070" --peers "$peers" --peer-token-file "$work/token"); fi
"$bin" mount s3://models/bench "$mp" "${args[@]}" >/dev/null
echo ready > "$out.ready"
while [ ! -e "$work/go" ]; do sleep 0.01; done
t0=$(date +%s.%N)
ls "$work/model" | grep safetensors | xargs -P 4 -I{} dd if="$mp/{}" of=/dev/null bs=1M status=none
t1=$(date +%s.%N)
ok=1; for f in "$work"/model/*.safetensors; do cmp -s "$f" "$mp/$(basename "$f")" || ok=0; done
"$bin" stat "$mp" --json > "$out.json"
echo "$t0 $t1 $ok" > "$out"
"$bin" unmount "$mp" >/dev/null; rm -rf "$cache"
NODE
chmod +x "$work/node.sh"

run() { # N PEERS(yes|no) -> "seconds origin_bytes all_ok"
  local n=$1 with=$2 peers="" pids=() i
  rm -f "$work/go" "$work"/res-*
  if [ "$with" = yes ]; then peers=$(for i in $(seq 1 "$n"); do printf '10.213.0.%d:7070,' $((10 + i)); done); peers=${peers%,}; fi
  sync; echo 3 > /proc/sys/vm/drop_caches
  for i in $(seq 1 "$n"); do
    ip netns exec "$(nsname "n$i")" "$work/node.sh" "$bin" "$i" "$peers" "$work" "$origin_ep" "$work/res-$i" &
    pids+=($!)
  done
  for i in $(seq 1 "$n"); do for _ in $(seq 1 600); do [ -e "$work/res-$i.ready" ] && break; sleep 0.1; done; done
  touch "$work/go"
  for p in "${pids[@]}"; do wait "$p"; done
  python3 - "$work" "$n" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
t0s, t1s, origin, ok = [], [], 0, True
for i in range(1, n + 1):
    a, b, good = open(f"{work}/res-{i}").read().split()
    t0s.append(float(a)); t1s.append(float(b)); ok &= good == "1"
    origin += json.load(open(f"{work}/res-{i}.json"))["bytes_from_source"]
print(f"{max(t1s) - min(t0s):.1f} {origin} {'yes' if ok else 'NO'}")
PY
}

printf '\nScale-out: %s model (4 shards), origin limited to %s by tc, nodes in network namespaces; %s cores\n\n' "$size" "$rate" "$(nproc)"
printf '| N | with peers: s | origin bytes / model | without peers: s | origin bytes / model | bytes verified |\n|---:|---:|---:|---:|---:|---|\n'
one=""
for n in $counts; do
  read -r tp op okp < <(run "$n" yes)
  read -r tn on okn < <(run "$n" no)
  [ -z "$one" ] && one=$tp
  printf '| %s | %s (%.2fx N=1) | %.2f | %s | %.2f | %s |\n' "$n" "$tp" "$(awk -v a="$tp" -v b="$one" 'BEGIN{print a/b}')" \
    "$(awk -v a="$op" -v b="$bytes" 'BEGIN{print a/b}')" "$tn" "$(awk -v a="$on" -v b="$bytes" 'BEGIN{print a/b}')" \
    "$([ "$okp$okn" = yesyes ] && echo yes || echo NO)"
done
