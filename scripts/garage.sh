#!/usr/bin/env bash
# A throwaway Garage (S3-compatible) server on loopback, for tests and benchmarks.
#   garage.sh config DIR   write DIR/garage.toml on free loopback ports
#   garage.sh init DIR     once the server runs: layout, bucket "models", a key
#   garage.sh start DIR    config, server in the background (pid in DIR/pid), init
#   garage.sh stop DIR     stop a server started with start
# GARAGE_BIND (default 127.0.0.1) is the address the S3 API listens on.
# config, init and start print KEY=VALUE lines: S3_ENDPOINT, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_REGION, BUCKET.
set -euo pipefail
cmd=${1:?usage: garage.sh config|init|start|stop DIR}
dir=${2:?usage: garage.sh config|init|start|stop DIR}
garage=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
cfg=$dir/garage.toml
key_id=GK0123456789abcdef01234567
secret=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

print_env() {
  local s3
  s3=$(sed -n '/\[s3_api\]/,/^\[/s/^api_bind_addr = "\(.*\)"/\1/p' "$cfg")
  printf 'S3_ENDPOINT=http://%s\nAWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_REGION=garage\nBUCKET=models\n' "$s3" "$key_id" "$secret"
}

config() {
  mkdir -p "$dir/meta" "$dir/data"
  cat > "$cfg" <<CFG
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$(free_port)"
rpc_secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

[s3_api]
s3_region = "garage"
api_bind_addr = "${GARAGE_BIND:-127.0.0.1}:$(free_port)"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$(free_port)"
CFG
}

init() {
  local i node
  for i in $(seq 1 100); do
    if "$garage" -c "$cfg" status >/dev/null 2>&1; then break; fi
    [ "$i" = 100 ] && { echo "garage.sh: the server did not come up; see $dir/garage.log" >&2; exit 1; }
    sleep 0.2
  done
  node=$("$garage" -c "$cfg" node id -q)
  node=${node%%@*}
  "$garage" -c "$cfg" layout assign -z dc1 -c 100G "$node" >/dev/null
  "$garage" -c "$cfg" layout apply --version 1 >/dev/null
  "$garage" -c "$cfg" bucket create models >/dev/null
  "$garage" -c "$cfg" key import --yes -n modelfs-test "$key_id" "$secret" >/dev/null
  "$garage" -c "$cfg" bucket allow --read --write --owner models --key modelfs-test >/dev/null
}

case $cmd in
  config) config; print_env ;;
  init) init; print_env ;;
  start)
    config
    "$garage" -c "$cfg" server > "$dir/garage.log" 2>&1 &
    echo $! > "$dir/pid"
    init
    print_env ;;
  stop) [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true ;;
  *) echo "usage: garage.sh config|init|start|stop DIR" >&2; exit 2 ;;
esac
