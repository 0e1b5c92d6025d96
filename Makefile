# Tether: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
PORT ?= 8000

.PHONY: demo test deps build bench fmt lint clean-demo

## Install missing system packages (Debian) and the browser-test driver.
deps:
	@bash .ci/install-deps.sh

## Build the relay and the agent, start both with a simulated boat, print the console URL.
demo: deps
	@PORT=$(PORT) bash examples/scripts/demo.sh

## Run every test: unit, integration, end-to-end (real binaries), browser.
test: deps
	$(CARGO) test --workspace --locked --no-fail-fast

## Release binaries.
build:
	$(CARGO) build --release --locked -p tether-relay -p tether-device

## Benchmarks: criterion micro-benchmarks, then the reconnect storm, SFU forwarding and idle
## connections against nats-server and Mosquitto (release build).
bench:
	$(CARGO) bench -p tether-signaling --bench parse
	$(CARGO) build --release --locked -p tether-relay -p tether-examples --bin tether-bench --bin tether-relay
	target/release/tether-bench storm --devices 10000
	target/release/tether-bench sfu --receivers 1,10,50 --seconds 20 --bitrate-kbps 2000
	target/release/tether-bench idle --counts 5000,10000,15000

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Forget the demo's relay database and device credentials.
clean-demo:
	rm -rf target/demo
