#!/usr/bin/env bash
# `make demo`: a relay with its SQLite store under target/demo, a provisioned demo boat running
# the real agent with the simulated boat, and the console URL with an operator key.
# Ctrl-C stops everything. State persists between runs (`make clean-demo` forgets it).
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT=${PORT:-8000}
DATA=target/demo
mkdir -p "$DATA"
chmod 700 "$DATA"

echo "demo: building (the first build takes a few minutes)..."
cargo build --release --locked -q -p tether-relay -p tether-device
RELAY=target/release/tether-relay
DEVICE=target/release/tether-device
DB="$DATA/tether.db"

# The admin key: generated once, kept next to the database (mode 600).
if [[ ! -s "$DATA/admin.key" ]]; then
  (umask 077; echo "tk_demo_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" > "$DATA/admin.key")
fi
ADMIN_KEY=$(cat "$DATA/admin.key")

# The demo boat's credential, created once.
if [[ ! -s "$DATA/boat.yaml" ]]; then
  if [[ ! -s "$DB" ]]; then
    # First start creates the default org and the admin; do it without serving.
    TETHER_ADMIN_KEY="$ADMIN_KEY" "$RELAY" --db "$DB" init >/dev/null
  fi
  creds=$("$RELAY" --db "$DB" device create --org default --id demo-boat --name "Demo boat" --json)
  secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["clientSecret"])' <<<"$creds")
  (umask 077; cat > "$DATA/boat.yaml" <<YAML
serverAddress: "ws://127.0.0.1:${PORT}/ws"
clientID: "demo-boat"
clientSecret: "${secret}"
name: "Demo boat"
logLevel: "info"
telemetry:
  rateHz: 5
  simulator: true
YAML
)
fi
# Follow the port if it changed since the file was written.
sed -i "s#^serverAddress: .*#serverAddress: \"ws://127.0.0.1:${PORT}/ws\"#" "$DATA/boat.yaml"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "demo: stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit 0
}
trap cleanup INT TERM EXIT

TETHER_ADMIN_KEY="$ADMIN_KEY" PORT="$PORT" "$RELAY" --db "$DB" --data-dir "$DATA" >"$DATA/relay.out" 2>"$DATA/relay.log" &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null 2>&1 && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "demo: the relay did not start; its log says:" >&2; tail -n 20 "$DATA/relay.log" >&2; exit 1
  fi
  sleep 0.1
done
curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null || { echo "demo: relay not healthy on port $PORT" >&2; exit 1; }

"$DEVICE" --config "$DATA/boat.yaml" 2>"$DATA/boat.log" &
pids+=($!)

cat <<MSG

  Tether demo is running.

    Console:       http://localhost:${PORT}/
    Operator key:  ${ADMIN_KEY}
    Health:        http://localhost:${PORT}/health
    Logs:          ${DATA}/relay.log, ${DATA}/boat.log

  Log in with the key, open "Demo boat" and watch its telemetry.
  From a terminal:  cargo run -q -p tether-examples --bin tether-pilot -- \\
                      --relay http://localhost:${PORT} --api-key ${ADMIN_KEY} --device demo-boat

  Ctrl-C stops the relay and the boat.
MSG
wait -n "${pids[@]}" || true
echo "demo: a process exited; see ${DATA}/*.log" >&2
