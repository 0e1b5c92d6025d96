#!/usr/bin/env bash
# `make demo`: a relay with its SQLite store under target/demo, a provisioned demo boat running
# the real agent, the simulated boat (`tether-boat`, a separate program that talks to the agent
# only through its local socket, as a team's own software would), and the console URL with an
# operator key.
# Ctrl-C stops everything. State persists between runs (`make clean-demo` forgets it).
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT=${PORT:-8000}
# DATA and PROFILE let developers run several stacks side by side (e.g. PROFILE=debug
# DATA=target/dev-1 PORT=8101); NO_BUILD=1 skips the build.
DATA=${DATA:-target/demo}
PROFILE=${PROFILE:-release}
mkdir -p "$DATA"
chmod 700 "$DATA"

if [[ "${NO_BUILD:-}" != 1 ]]; then
  echo "demo: building (the first build takes a few minutes)..."
  profile_flag=--release
  [[ "$PROFILE" == debug ]] && profile_flag=
  cargo build $profile_flag --locked -q -p tether-relay -p tether-device -p tether-examples --bin tether-relay \
    --bin tether-device --bin tether-boat --bin tether-pilot
fi
RELAY=target/$PROFILE/tether-relay
DEVICE=target/$PROFILE/tether-device
BOAT=target/$PROFILE/tether-boat
SOCKET="$PWD/$DATA/robot.sock"
DB="$DATA/tether.db"

# The admin key: generated once, kept next to the database (mode 600).
if [[ ! -s "$DATA/admin.key" ]]; then
  (umask 077; echo "tk_demo_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" > "$DATA/admin.key")
fi
ADMIN_KEY=$(cat "$DATA/admin.key")
# Passwords for the console's username/password login: the admin's and a demo pilot's.
for who in admin pilot; do
  if [[ ! -s "$DATA/$who.password" ]]; then
    (umask 077; echo "$who-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')" > "$DATA/$who.password")
  fi
done
ADMIN_PASSWORD=$(cat "$DATA/admin.password")
PILOT_PASSWORD=$(cat "$DATA/pilot.password")

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
  systemMetrics: true
  udp: "127.0.0.1:47300"
  unixSocket: "robot.sock"
commands:
  allow: ["uptime", "df", "free", "ip", "echo"]
# A supervised process, so the console's process list and log console have something to show.
paths:
  bilge-monitor:
    runOnInit: "sh -c 'while true; do echo \\"INFO bilge pump idle, level 3 cm\\"; sleep 5; echo \\"WARN bilge level 7 cm\\" >&2; sleep 5; done'"
    runOnInitRestart: "yes"
safety:
  policy: hold
video:
  enabled: true
  source: testpattern
  codec: h264
  width: 960
  height: 540
  framerate: 25
YAML
)
fi
# Follow the port (and the socket path) if they changed since the file was written.
sed -i "s#^serverAddress: .*#serverAddress: \"ws://127.0.0.1:${PORT}/ws\"#" "$DATA/boat.yaml"
grep -q '^video:' "$DATA/boat.yaml" || printf 'video:\n  enabled: true\n  source: testpattern\n  width: 960\n  height: 540\n  framerate: 25\n' >> "$DATA/boat.yaml"
grep -q '^  unixSocket:' "$DATA/boat.yaml" || sed -i "s#^telemetry:#telemetry:\n  unixSocket: \"${SOCKET}\"#" "$DATA/boat.yaml"
sed -i "s#^  unixSocket: .*#  unixSocket: \"${SOCKET}\"#; s#^  simulator: true#  simulator: false#" "$DATA/boat.yaml"

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

# The admin's password (set every start, so it matches the file) and the demo pilot.
api() { curl -sS -H "Authorization: Bearer $ADMIN_KEY" -H 'Content-Type: application/json' "$@"; }
admin_id=$(api "http://127.0.0.1:${PORT}/api/me" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
api -X PUT -d "{\"password\":\"${ADMIN_PASSWORD}\"}" "http://127.0.0.1:${PORT}/api/operators/${admin_id}/password" >/dev/null
api -X POST -d "{\"username\":\"pilot\",\"role\":\"pilot\",\"password\":\"${PILOT_PASSWORD}\",\"access\":\"control\"}" \
  "http://127.0.0.1:${PORT}/api/operators" >/dev/null   # 409 after the first start: it exists

"$DEVICE" --config "$DATA/boat.yaml" 2>"$DATA/agent.log" &
pids+=($!)
"$BOAT" --socket "$SOCKET" 2>"$DATA/boat.log" &
pids+=($!)

cat <<MSG

  Tether demo is running.

    Console:       http://localhost:${PORT}/
    Admin:         username admin, password ${ADMIN_PASSWORD}   (or the API key ${ADMIN_KEY})
    Pilot:         username pilot, password ${PILOT_PASSWORD}   (control on every device)
    Health:        http://localhost:${PORT}/health
    Logs:          ${DATA}/relay.log, ${DATA}/agent.log, ${DATA}/boat.log

  In the console: log in, open "Demo boat" and press Start video (a test pattern with a clock).
  Take control, click "Edit waypoints" and click the map, then Send: the boat turns toward
  them. Press Drive and hold W/A/S/D (or a gamepad's stick with RB held) to steer by hand.
  "Commands & processes" runs uptime/echo, a speed test, restarts bilge-monitor and edits the
  agent's config; "Log" shows its output. Admin (top bar) manages devices, operators, keys,
  handshake keys (onboarding: run a second tether-device with the snippet it shows, then
  approve it in the fleet), permissions, the deny list and the audit log.
  From a terminal:
    follow:  target/release/tether-pilot --relay http://localhost:${PORT} --api-key ${ADMIN_KEY} --device demo-boat
    steer:   ... --device demo-boat --waypoint 37.8150,-122.4250
             ... --device demo-boat --command teleop --data '{"throttle":0.6,"rudder":-0.4}'
    (the boat's course changes; stop the pilot and its lease expires: the agent tells the boat to hold)

  Ctrl-C stops the relay, the agent and the boat.
MSG
wait -n "${pids[@]}" || true
echo "demo: a process exited; see ${DATA}/*.log" >&2
