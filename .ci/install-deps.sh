#!/usr/bin/env bash
# Installs what Tether's build, demo and tests need and the machine lacks. Idempotent: a second
# run installs nothing. System packages come from Debian (apt-get, as root); the browser-test
# driver (playwright-core, no browser download) from npm into client-web/e2e/node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: a C compiler for SQLite (bundled); curl for the demo's health wait.
# Browser tests: Debian's chromium and firefox-esr (driven over WebDriver BiDi) and fonts so
# pages render text.
# Video: GStreamer's development files and the plugins for capture, encoding and RTP.
# Python client (examples/python, tested by relay/tests/python_client.rs): websockets 10.x.
# Benchmarks (`tether-bench telemetry`, `make bench`): the brokers Tether is compared with, and
# taskset (util-linux) to pin server and load generator to their cores.
PACKAGES=(build-essential pkg-config curl chromium firefox-esr fonts-dejavu-core
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-tools gstreamer1.0-x
  python3-websockets nats-server mosquitto util-linux)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "install-deps: installing Debian packages: ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: these packages are missing and this is not root." >&2
    echo "install-deps: run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is not on PATH; install Rust 1.95 (rustup) first." >&2
  exit 1
fi

if ! command -v npm >/dev/null; then
  echo "install-deps: npm is missing; installing Debian's nodejs and npm."
  [[ $(id -u) -eq 0 ]] || { echo "install-deps: run as root or install nodejs and npm" >&2; exit 1; }
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

if [[ ! -d client-web/e2e/node_modules/playwright-core ]]; then
  echo "install-deps: installing playwright-core for the browser tests (no browser download)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix client-web/e2e --no-audit --no-fund --loglevel=error
fi
