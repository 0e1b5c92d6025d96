#!/usr/bin/env bash
# The agent's footprint: stripped binary size and idle memory, measured on this machine.
#   bash examples/scripts/agent-footprint.sh            (the shipped build: profile release-small)
#   PROFILE=release bash examples/scripts/agent-footprint.sh
#   VIDEO=0 bash examples/scripts/agent-footprint.sh     (the agent without its video feature)
#   CARGO_TARGET_DIR=... bash examples/scripts/agent-footprint.sh   (the agent built elsewhere)
# Starts a throwaway relay and one agent (system metrics on, local inputs open, no simulator),
# lets it settle, then reads VmRSS/VmHWM from /proc.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-release-small}
SETTLE=${SETTLE:-20}
VIDEO=${VIDEO:-1}
TARGET=${CARGO_TARGET_DIR:-target}
# The relay is only the agent's counterpart here: release profile, in the default target dir.
env -u CARGO_TARGET_DIR cargo build --release --locked -q -p tether-relay --bin tether-relay
RELAY=target/release/tether-relay
if [[ $VIDEO == 0 ]]; then
  # A separate target dir keeps the two agent builds from overwriting each other.
  CARGO_TARGET_DIR=$TARGET/novideo cargo build --profile "$PROFILE" --locked -q -p tether-device --no-default-features \
    --bin tether-device
  AGENT_BIN=$TARGET/novideo/$PROFILE/tether-device
else
  CARGO_TARGET_DIR=$TARGET cargo build --profile "$PROFILE" --locked -q -p tether-device --bin tether-device
  AGENT_BIN=$TARGET/$PROFILE/tether-device
fi
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

strip -o "$WORK/tether-device" "$AGENT_BIN"
size=$(stat -c %s "$WORK/tether-device")
echo "profile:              $PROFILE, video feature: $VIDEO"
unstripped=$(stat -c %s "$AGENT_BIN")
if [[ $unstripped == "$(stat -c %s "$WORK/tether-device")" ]]; then
  echo "agent binary:         already stripped by the profile (CARGO_PROFILE_RELEASE_SMALL_STRIP=false keeps symbols)"
else
  echo "agent binary:         $unstripped bytes unstripped"
fi
echo "agent binary:         $size bytes stripped ($(awk "BEGIN{printf \"%.2f\", $size/1048576}") MiB)"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TETHER_ADMIN_KEY=tk_footprint_0123456789 "$RELAY" --db "$WORK/t.db" init >/dev/null
creds=$("$RELAY" --db "$WORK/t.db" device create --org default --id fp-boat --name fp --json)
secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["clientSecret"])' <<<"$creds")
PORT=$PORT "$RELAY" --db "$WORK/t.db" --data-dir "$WORK" 2>"$WORK/relay.log" &
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
cat > "$WORK/config.yaml" <<YAML
serverAddress: "ws://127.0.0.1:$PORT/ws"
clientID: fp-boat
clientSecret: "$secret"
telemetry:
  udp: "127.0.0.1:0"
  unixSocket: "$WORK/robot.sock"
YAML
"$WORK/tether-device" --config "$WORK/config.yaml" 2>"$WORK/agent.log" &
AGENT=$!
sleep "$SETTLE"
grep -q "authenticated with the relay" "$WORK/agent.log" || { echo "the agent did not connect:"; cat "$WORK/agent.log"; exit 1; }
rss=$(awk '/VmRSS/{print $2}' /proc/$AGENT/status)
hwm=$(awk '/VmHWM/{print $2}' /proc/$AGENT/status)
threads=$(awk '/Threads/{print $2}' /proc/$AGENT/status)
cpu=$(awk '{print ($14+$15)/100}' /proc/$AGENT/stat)
echo "idle agent after ${SETTLE}s: VmRSS ${rss} KiB, peak ${hwm} KiB, ${threads} thread(s), ${cpu} CPU-seconds used"
