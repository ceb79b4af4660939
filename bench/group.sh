#!/usr/bin/env bash
# Scale-out: N = 1, 2, 4, 8 nodes load one model at once from an origin whose
# bandwidth tc limits, with the peer group and without it. Each node is a
# network namespace made here; the bridge lives in a namespace of its own, so
# no address of this test is routed from the host's namespace. Prints the time
# for all N nodes to finish and the origin bytes, per N.
# Then a node joining the largest warm group, and that many cold nodes served by
# a preloaded warm-up service (no peers).
# The origin's rate is low enough that the protocol decides the time rather
# than this machine's cores; --node-rate also caps each node's uplink, as a
# NIC would (the owners' hot spots show only when uplinks are finite).
# Besides the tables, one JSON line per N (prefixed "json ") for scripts.
# --bin runs another build (e.g. main's, to compare protocols).
# Usage: bench/group.sh [--size 512MiB] [--rate 200mbit] [--node-rate RATE]
#                       [--nodes "1 2 4 8"] [--bin PATH] [--no-baseline]
set -euo pipefail
cd "$(dirname "$0")/.."
size=512MiB rate=200mbit node_rate="" counts="1 2 4 8" bin="" baseline=yes
usage='usage: bench/group.sh [--size 512MiB] [--rate 200mbit] [--node-rate RATE] [--nodes "1 2 4 8"] [--bin PATH] [--no-baseline]'
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --node-rate) node_rate=$2; shift 2 ;;
    --nodes) counts=$2; shift 2 ;;
    --bin) bin=$(realpath "$2"); shift 2 ;;
    --no-baseline) baseline=no; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
if [ -z "$bin" ]; then
  cargo build --release -q
  bin=$PWD/target/release/modelfs
fi
[ -x "$bin" ] || { echo "--bin $bin: not an executable; build it or give the path to modelfs" >&2; exit 2; }
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
attach warmup 10.213.0.2
for i in $(seq 1 $((max + 1))); do
  attach "n$i" "10.213.0.$((10 + i))"
  [ -n "$node_rate" ] && ip netns exec "$(nsname "n$i")" tc qdisc add dev eth0 root tbf rate "$node_rate" burst 256kb latency 100ms
done
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
bin=$1 i=$2 peers=$3 work=$4 ep=$5 out=$6 warmup=${7:-} hold=${8:-}
mp=$work/mnt-$i; mkdir -p "$mp"
cache=/dev/shm/$(basename "$work")-$i; rm -rf "$cache"
args=(--endpoint "$ep" --cache-dir "$cache" --cache-size 4GiB)
if [ -n "$peers" ]; then args+=(--listen "10.213.0.$((10 + i)):7070" --peers "$peers" --peer-token-file "$work/token"); fi
if [ -n "$warmup" ]; then args+=(--warmup-service "$warmup" --peer-token-file "$work/token"); fi
"$bin" mount s3://models/bench "$mp" "${args[@]}" >/dev/null
echo ready > "$out.ready"
while [ ! -e "$work/go" ]; do sleep 0.01; done
t0=$(date +%s.%N)
ls "$work/model" | grep safetensors | xargs -P 4 -I{} dd if="$mp/{}" of=/dev/null bs=1M status=none
t1=$(date +%s.%N)
ok=1; for f in "$work"/model/*.safetensors; do cmp -s "$f" "$mp/$(basename "$f")" || ok=0; done
"$bin" stat "$mp" --json > "$out.json"
echo "$t0 $t1 $ok" > "$out"
# A held node stays up, warm, until the run is over (the joiner reads from it).
if [ -n "$hold" ]; then while [ ! -e "$work/stop" ]; do sleep 0.1; done; fi
"$bin" unmount "$mp" >/dev/null; rm -rf "$cache"
NODE
chmod +x "$work/node.sh"

peer_list() { local i; for i in $(seq 1 "$1"); do printf '10.213.0.%d:7070,' $((10 + i)); done | sed 's/,$//'; }

# Nodes FIRST..LAST load at once -> "seconds origin_bytes all_ok".
# PEERS is a list or empty; WARMUP a warm-up service URL or empty; HOLD keeps them up.
run_nodes() {
  local first=$1 last=$2 peers=$3 warmup=$4 hold=$5 pids=() i
  rm -f "$work/go"
  for i in $(seq "$first" "$last"); do rm -f "$work/res-$i" "$work/res-$i".*; done
  sync; echo 3 > /proc/sys/vm/drop_caches
  for i in $(seq "$first" "$last"); do
    ip netns exec "$(nsname "n$i")" "$work/node.sh" "$bin" "$i" "$peers" "$work" "$origin_ep" "$work/res-$i" "$warmup" "$hold" &
    pids+=($!)
  done
  for i in $(seq "$first" "$last"); do for _ in $(seq 1 600); do [ -e "$work/res-$i.ready" ] && break; sleep 0.1; done; done
  touch "$work/go"
  if [ -n "$hold" ]; then
    for i in $(seq "$first" "$last"); do for _ in $(seq 1 3000); do [ -e "$work/res-$i" ] && break; sleep 0.1; done; done
    held_pids+=("${pids[@]}")
  else
    for p in "${pids[@]}"; do wait "$p"; done
  fi
  python3 - "$work" "$first" "$last" <<'PY'
import json, sys
work, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0s, t1s, origin, ok, errors, holders = [], [], 0, True, 0, 0
for i in range(first, last + 1):
    a, b, good = open(f"{work}/res-{i}").read().split()
    t0s.append(float(a)); t1s.append(float(b)); ok &= good == "1"
    st = json.load(open(f"{work}/res-{i}.json"))
    origin += st["bytes_from_source"]
    # Failed peer requests (sent to the origin instead), and chunks from
    # holders (0 for builds without redirects).
    errors += sum(p["errors"] for p in st["peers"].values())
    holders += st.get("chunks_from_holders", 0)
print(f"{max(t1s) - min(t0s):.1f} {origin} {'yes' if ok else 'NO'} {errors} {holders}")
PY
}
held_pids=()
run() { # N PEERS(yes|no) -> "seconds origin_bytes all_ok"
  local peers=""
  [ "$2" = yes ] && peers=$(peer_list "$1")
  run_nodes 1 "$1" "$peers" "" ""
}

printf '\nScale-out: %s model (4 shards), origin limited to %s by tc, node uplinks %s, nodes in network namespaces; %s cores; %s\n\n' \
  "$size" "$rate" "${node_rate:-unlimited}" "$(nproc)" "$bin"
printf '| N | with peers: s | x N=1 | origin bytes / model | without peers: s | x N=1 | origin bytes / model | bytes verified |\n|---:|---:|---:|---:|---:|---:|---:|---|\n'
one="" one_n="" jsons=()
# null for a run skipped (--no-baseline).
div() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a != "null" && b > 0) printf "%.2f", a / b; else print "null" }'; }
for n in $counts; do
  read -r tp op okp ep hp < <(run "$n" yes)
  tn=null on=null okn=yes
  [ "$baseline" = yes ] && read -r tn on okn _ _ < <(run "$n" no)
  [ -z "$one" ] && one=$tp one_n=$tn
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$n" "$tp" "$(div "$tp" "$one")" "$(div "$op" "$bytes")" \
    "$tn" "$(div "$tn" "$one_n")" "$(div "$on" "$bytes")" "$([ "$okp$okn" = yesyes ] && echo yes || echo NO)"
  jsons+=("$(printf '{"n":%s,"model_bytes":%s,"origin_rate":"%s","node_rate":"%s","peers_s":%s,"peers_x1":%s,"peers_origin_x":%s,"no_peers_s":%s,"no_peers_x1":%s,"no_peers_origin_x":%s,"peer_errors":%s,"chunks_from_holders":%s,"verified":%s}' \
    "$n" "$bytes" "$rate" "${node_rate:-}" "$tp" "$(div "$tp" "$one")" "$(div "$op" "$bytes")" \
    "$tn" "$(div "$tn" "$one_n")" "$(div "$on" "$bytes")" "$ep" "$hp" "$([ "$okp$okn" = yesyes ] && echo true || echo false)")")
done
echo
for j in "${jsons[@]}"; do echo "json $j"; done

ratio() { awk -v a="$1" -v b="$bytes" 'BEGIN{printf "%.2f", a / b}'; }
big=$(echo "$counts" | awk '{print $NF}')
# A node joining a warm group: BIG nodes load and stay up, then one more joins.
read -r _ _ _ _ _ < <(run_nodes 1 "$big" "$(peer_list "$big")" "" hold)
read -r tj oj okj _ _ < <(run_nodes $((big + 1)) $((big + 1)) "$(peer_list $((big + 1)))" "" "")
touch "$work/stop"; for p in "${held_pids[@]}"; do wait "$p" || true; done; rm -f "$work/stop"
# A warm-up service preloaded with the model, in its own namespace; BIG cold nodes without peers.
ip netns exec "$(nsname warmup)" "$bin" serve s3://models --listen 10.213.0.2:7070 --preload bench/ \
  --endpoint "$origin_ep" --peer-token-file "$work/token" --cache-dir "/dev/shm/$tag-warmup" --cache-size 4GiB \
  > "$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 1200); do grep -q "serving s3://models" "$work/serve.log" && break; sleep 0.1; done
read -r tw ow okw _ _ < <(run_nodes 1 "$big" "" "http://10.213.0.2:7070" "")
kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
printf '\n| case | s | origin bytes / model | bytes verified |\n|---|---:|---:|---|\n'
printf '| a node joining %s warm nodes | %s | %s | %s |\n' "$big" "$tj" "$(ratio "$oj")" "$okj"
printf '| %s cold nodes, warm-up service preloaded | %s | %s | %s |\n' "$big" "$tw" "$(ratio "$ow")" "$okw"
