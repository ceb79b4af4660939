#!/usr/bin/env bash
# Cold and warm reads through a modelfs mount, next to the alternatives, on the
# same files in one run:
#   cold: the mount (empty cache) vs reading the source directory directly
#   warm: the mount vs reading the cache's own bytes from tmpfs directly
# Every figure is a ratio measured in this run; page caches are dropped before
# each cold step. Usage: bench/mount.sh [--size 2GiB] [--files 4]
set -euo pipefail
cd "$(dirname "$0")/.."

size=2GiB files=4
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    *) echo "usage: $0 [--size 2GiB] [--files 4]" >&2; exit 2 ;;
  esac
done

cargo build --release -q
bin=$PWD/target/release/modelfs
work=$(mktemp -d /var/tmp/modelfs-bench.XXXXXX)
cache=$(mktemp -d /dev/shm/modelfs-bench-cache.XXXXXX)
mnt=$work/mnt
cleanup() {
  "$bin" unmount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" 2>/dev/null || true
  rm -rf "$work" "$cache"
}
trap cleanup EXIT
mkdir -p "$mnt"

"$bin" synth "$work/src" --size "$size" --files "$files" >/dev/null
mapfile -t names < <(cd "$work/src" && ls *.safetensors)
bytes=$(cd "$work/src" && cat "${names[@]}" | wc -c)

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Reads every file in $1 with dd in 1 MiB blocks; prints MB/s.
read_all() {
  local dir=$1 t0 t1
  t0=$(date +%s.%N)
  for n in "${names[@]}"; do dd if="$dir/$n" of=/dev/null bs=1M status=none; done
  t1=$(date +%s.%N)
  echo "$bytes $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2) / 1e6}'
}

drop; src_cold=$(read_all "$work/src")
"$bin" mount "$work/src" "$mnt" --cache-dir "$cache" --cache-size 8GiB >/dev/null
drop; mnt_cold=$(read_all "$mnt")
# The first reopen after the cold read switches each file to passthrough (the
# kernel drops the FUSE page cache of the inode then); later opens are steady.
mnt_warm_first=$(read_all "$mnt")
drop; mnt_warm=$(read_all "$mnt")
# The cache's own bytes, read straight from tmpfs (same files, same order).
mapfile -t data < <(ls -S "$cache"/*.data)
t0=$(date +%s.%N); for d in "${data[@]}"; do dd if="$d" of=/dev/null bs=1M status=none; done; t1=$(date +%s.%N)
tmpfs=$(echo "$bytes $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2) / 1e6}')
stats=$("$bin" stat "$mnt" --json)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a / b}'; }
printf '\nmodelfs mount benchmark: %s in %s files, %s cores, kernel %s\n\n' "$size" "${#names[@]}" "$(nproc)" "$(uname -r)"
printf '| read (dd bs=1M, sequential) | MB/s | ratio |\n|---|---:|---:|\n'
printf '| source directory, cold | %s | 1.00 (cold baseline) |\n' "$src_cold"
printf '| modelfs, cold (empty cache) | %s | %s of source |\n' "$mnt_cold" "$(ratio "$mnt_cold" "$src_cold")"
printf '| cache bytes on tmpfs, read directly | %s | 1.00 (warm baseline) |\n' "$tmpfs"
printf '| modelfs, warm, after drop_caches (chunk cache, passthrough) | %s | %s of tmpfs |\n' "$mnt_warm" "$(ratio "$mnt_warm" "$tmpfs")"
printf '| modelfs, warm, first reopen after the cold read | %s | %s of tmpfs |\n' "$mnt_warm_first" "$(ratio "$mnt_warm_first" "$tmpfs")"
echo
echo "$stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("source bytes %d for %d model bytes; passthrough %s (%d opens)" % (s["bytes_from_source"], '"$bytes"', s["passthrough"], s["passthrough_opens"]))'
