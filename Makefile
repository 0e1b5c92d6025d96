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

## Release binaries: the relay, and the agent as shipped (release-small: size-optimised, stripped;
## it lands in target/release-small/tether-device).
build:
	$(CARGO) build --release --locked -p tether-relay
	$(CARGO) build --profile release-small --locked -p tether-device

## Benchmarks (docs/benchmarks.md): criterion micro-benchmarks, then telemetry side by side with
## nats-server and Mosquitto, idle connections (5k/10k/15k) against both, SFU forwarding, the
## reconnect storm, and the agent's footprint.
## Release builds; servers and load generators are pinned to different cores.
BENCH_QUICK = -- --warm-up-time 1 --measurement-time 3
bench: deps
	$(CARGO) bench --locked -p tether-signaling --bench parse $(BENCH_QUICK)
	$(CARGO) bench --locked -p tether-relay --bench rate_limit $(BENCH_QUICK)
	$(CARGO) bench --locked -p tether-relay --bench hub $(BENCH_QUICK)
	$(CARGO) build --release --locked -p tether-relay -p tether-examples --bin tether-bench --bin tether-relay
	target/release/tether-bench telemetry --devices 200 --rate 20 --pilots 3 --seconds 20 --rounds 2 --saturation
	target/release/tether-bench sfu --receivers 1,10,50 --seconds 20 --bitrate-kbps 2000
	target/release/tether-bench idle --counts 5000,10000,15000
	target/release/tether-bench storm --devices 10000
	bash examples/scripts/agent-footprint.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Forget the demo's relay database and device credentials.
clean-demo:
	rm -rf target/demo
