#!/usr/bin/env bash
# What a cold load costs the host, not just how fast it is (issue #11): a model
# read by one reader per file with the page cache dropped, through a fresh
# modelfs mount, against reading the source directly. Reports the ratio of
# wall times, the daemon's CPU seconds per GiB (utime+stime of the daemon from
# /proc) and its peak RSS (VmHWM), then a warm read of the same mount. Every
# byte read is compared with the source.
#   bench/cold_cpu.sh [--local SIZE] [--s3 SIZE] [--files N] [--bin PATH] [--runs N]
# Defaults: --local 1GiB --s3 2GiB --files 4 --runs 1; --local 0 or --s3 0 skips one.
set -euo pipefail
cd "$(dirname "$0")/.."
local_size=1GiB s3_size=2GiB files=4 bin="" runs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --local) local_size=$2; shift 2 ;;
    --s3) s3_size=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--local 1GiB] [--s3 2GiB] [--files 4] [--bin PATH] [--runs N]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
if [ -z "$bin" ]; then cargo build --release -q; bin=$PWD/target/release/modelfs; fi
work=$(mktemp -d /var/tmp/modelfs-cold-cpu.XXXXXX)
shm=$(mktemp -d /dev/shm/modelfs-cold-cpu.XXXXXX)
mnt=""
garage_up=""
cleanup() {
  if [ -n "$mnt" ]; then "$bin" unmount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" 2>/dev/null || true; fi
  if [ -n "$garage_up" ]; then scripts/garage.sh stop "$work/garage" || true; fi
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
clk=$(getconf CLK_TCK)
# utime + stime of PID, in seconds.
cpu_of() { awk -v hz="$clk" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }
hwm_of() { awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }

# Every file of DIR at once, one dd each; prints the wall seconds.
load() {
  local dir=$1 t0 t1
  t0=$(now)
  (cd "$dir" && ls) | xargs -P "$files" -I{} dd if="$dir/{}" of=/dev/null bs=1M status=none
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}
check() {
  local n
  for n in $(cd "$2" && ls); do
    cmp -s "$1/$n" "$2/$n" || { echo "WRONG BYTES in $1/$n" >&2; exit 1; }
  done
}

# One cold load through a fresh mount of SOURCE (extra mount flags after it);
# prints "wall cpu_s_per_gib rss_mib warm_mbps".
measure() {
  local src=$1 model=$2 bytes pid c0 c1 wall warm
  shift 2
  bytes=$(du -sb "$model" | cut -f1)
  mnt=$work/mnt; mkdir -p "$mnt"
  rm -rf "$shm/cache"
  "$bin" mount "$src" "$mnt" --cache-dir "$shm/cache" --cache-size 8GiB "$@" >/dev/null
  pid=$("$bin" stat "$mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
  drop
  c0=$(cpu_of "$pid")
  wall=$(load "$mnt")
  c1=$(cpu_of "$pid")
  local rss
  rss=$(hwm_of "$pid")
  check "$mnt" "$model"
  # Warm: every chunk cached; page cache dropped so the reads reach the daemon
  # (or the passthrough file) again.
  drop
  local w
  w=$(load "$mnt")
  warm=$(awk -v b="$bytes" -v t="$w" 'BEGIN { printf "%.0f", b / t / 1e6 }')
  "$bin" unmount "$mnt" >/dev/null; mnt=""
  awk -v w="$wall" -v c0="$c0" -v c1="$c1" -v b="$bytes" -v r="$rss" -v warm="$warm" \
    'BEGIN { printf "%s %.2f %s %s\n", w, (c1 - c0) / (b / 2^30), r, warm }'
}

if [ "$local_size" != 0 ]; then
  "$bin" synth "$work/local" --size "$local_size" --files "$files" >/dev/null
  for r in $(seq "$runs"); do
    drop
    direct=$(load "$work/local")
    read -r wall cpu rss warm <<<"$(measure "$work/local" "$work/local")"
    ratio=$(awk -v d="$direct" -v w="$wall" 'BEGIN { printf "%.2f", d / w }')
    echo "local $local_size x$files run $r: direct ${direct}s modelfs ${wall}s ratio(direct/modelfs) $ratio cpu ${cpu}s/GiB peak_rss ${rss}MiB warm ${warm}MB/s"
  done
fi

if [ "$s3_size" != 0 ]; then
  eval "$(scripts/garage.sh start "$work/garage" | sed 's/^/export /')"
  garage_up=1
  "$bin" synth "$work/s3model" --size "$s3_size" --files "$files" >/dev/null
  "$bin" push "$work/s3model" s3://models/cold --endpoint "$S3_ENDPOINT" >/dev/null
  for r in $(seq "$runs"); do
    read -r wall cpu rss warm <<<"$(measure s3://models/cold "$work/s3model" --endpoint "$S3_ENDPOINT")"
    echo "s3 $s3_size x$files run $r: modelfs ${wall}s cpu ${cpu}s/GiB peak_rss ${rss}MiB warm ${warm}MB/s"
  done
fi
