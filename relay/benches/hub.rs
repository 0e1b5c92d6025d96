//! One hub routing step: a device's telemetry frame put on the outgoing queues of the pilots
//! subscribed to it, with 1, 3 and 50 subscribers.
//!
//! - `publish_telemetry/<n>`: [`relay::hub::LocalHub::publish_telemetry`], the call the relay
//!   makes once per telemetry frame (`conn.rs`, `on_telemetry`): the device's channel lock, the
//!   replay buffer (the relay's default of 100 frames), and one push on each subscriber's
//!   [`relay::outbox::Outbox`] telemetry lane (a reference-counted clone of the frame, a short
//!   lock, a wake-up). The frame is the 525-byte forwarded frame the relay makes from the parse
//!   benchmark's telemetry frame.
//! - `telemetry_path/<n>`: everything the relay's `on_telemetry` does for that frame, made of the
//!   same public pieces in the same order: `decode_frame` on the incoming text, the device's
//!   telemetry state lock with the sequence check, gap health and the clock estimate (16 clock
//!   samples, as after a few minutes online), the annotation, `encode_forwarded_telemetry`, and
//!   `publish_telemetry`. Left out: the connection's battery sampling (one frame a second at
//!   most) and the metric counters (relaxed atomic adds).
//!
//! The subscribers' queues are drained between batches of 200 frames, outside the timed part,
//! so they never overflow (the relay's telemetry lane holds 256 frames): what is timed is the
//! producer side only. No writer task waits on the queues here, so a push's wake-up only
//! stores a permit; in the relay it also schedules the pilot's writer task, which this does
//! not measure.
//!
//! Run: `cargo bench -p tether-relay --bench hub` (docs/benchmarks.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use parking_lot::Mutex;
use relay::DeviceTelemetry;
use relay::auth::{Identity, Role};
use relay::hub::{Conn, FanOut, Hub, LocalHub};
use relay::outbox::Outbox;
use signaling::message::{self, Frame, TelemetryAnnotation};
use tokio_tungstenite::tungstenite::Utf8Bytes;

const DEVICE: &str = "boat-1";
const SUBSCRIBERS: [usize; 3] = [1, 3, 50];
/// Frames published between two drains of the subscribers' queues.
const BATCH: u64 = 200;
/// The relay's defaults (`relay/src/config.rs`): replay buffer, control and telemetry lanes.
const REPLAY_BUFFER: usize = 100;
const CONTROL_QUEUE: usize = 1024;
const TELEMETRY_QUEUE: usize = 256;

/// The parse benchmark's telemetry frame, with its sequence number as a parameter.
fn incoming(sequence: u64) -> String {
    format!(
        r#"{{"type":"telemetry","payload":{{"subtype":"sensor_data","sequence":{sequence},"timestamp":1732262400123,"system_time":1732262400125,"epoch":"9f2c41aa","data":{{"gps":{{"latitude":37.808123,"longitude":-122.417745,"heading":225.5,"speed":2.31}},"battery":{{"percent":81.5,"voltage":12.3}},"status":"autonomous_navigation","water":{{"temperature":14.2,"salinity":33.1}}}}}}}}"#
    )
}

fn conn(id: u64, who: &str, role: Role) -> Arc<Conn> {
    Arc::new(Conn {
        id,
        identity: Identity {
            id: who.into(),
            org: "default".into(),
            role,
            name: who.into(),
            credential: None,
            ticket: None,
        },
        outbox: Arc::new(Outbox::new(CONTROL_QUEUE, TELEMETRY_QUEUE)),
        peer_ip: None,
    })
}

/// A hub with the device online and `n` pilots subscribed to it (their `subscribed` answers
/// already taken off their queues).
fn hub_with(n: usize) -> (LocalHub, Vec<Arc<Conn>>) {
    let hub = LocalHub::new(REPLAY_BUFFER);
    hub.attach(conn(1, DEVICE, Role::Device));
    let pilots: Vec<Arc<Conn>> = (0..n).map(|i| conn(2 + i as u64, &format!("pilot-{i}"), Role::Pilot)).collect();
    for p in &pilots {
        hub.attach(p.clone());
        hub.subscribe(DEVICE, p, false, false, None);
    }
    drain(&pilots);
    (hub, pilots)
}

/// Empties the pilots' queues; returns how many messages they held.
fn drain(pilots: &[Arc<Conn>]) -> usize {
    let mut n = 0;
    for p in pilots {
        while p.outbox.try_next().is_some() {
            n += 1;
        }
    }
    n
}

/// What the relay forwards for [`incoming`]: the device's payload with the relay's annotation.
fn forwarded() -> Utf8Bytes {
    let text = incoming(123_456);
    let Ok(Frame::Telemetry { payload, .. }) = message::decode_frame(&text) else { unreachable!() };
    let annotation = TelemetryAnnotation {
        received_at: 1_732_262_400_158.25,
        stream: "sensor_data".into(),
        verdict: "ok".into(),
        missing: None,
        lost_total: 0,
        age_ms: Some(35.0),
        clock_offset_ms: Some(-1.5),
        clock_uncertainty_ms: Some(0.8),
        replay: false,
    };
    Utf8Bytes::from(message::encode_forwarded_telemetry(DEVICE, payload, &annotation))
}

fn publish(c: &mut Criterion) {
    let frame = forwarded();
    let mut g = c.benchmark_group("publish_telemetry");
    g.throughput(Throughput::Elements(1));
    for n in SUBSCRIBERS {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let (hub, pilots) = hub_with(n);
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let k = left.min(BATCH);
                    let start = Instant::now();
                    for _ in 0..k {
                        black_box(hub.publish_telemetry(black_box(DEVICE), frame.clone()));
                    }
                    total += start.elapsed();
                    assert_eq!(drain(&pilots), k as usize * n, "every frame reaches every subscriber");
                    left -= k;
                }
                total
            })
        });
    }
    g.finish();
}

/// The relay's `on_telemetry` for one incoming frame, from the public pieces it is made of.
fn on_telemetry(hub: &LocalHub, state: &Mutex<DeviceTelemetry>, clock: &relay::RelayClock, text: &Utf8Bytes) -> FanOut {
    let Ok(Frame::Telemetry { header, payload, .. }) = message::decode_frame(text.as_str()) else {
        unreachable!("a valid telemetry frame")
    };
    let now = clock.now_ms();
    let stream = header.stream_name();
    let (verdict, counters, estimate) = {
        let mut st = state.lock();
        let (v, c) = st.sequences.observe_ref(stream, header.sequence, header.epoch.as_deref(), header.backfill);
        st.health.verdict(v, stream, now);
        (v, c, st.clock.estimate(now))
    };
    let annotation = TelemetryAnnotation::live(now, stream, verdict, counters, estimate, header.timestamp);
    let text = message::encode_forwarded_telemetry(DEVICE, payload, &annotation);
    hub.publish_telemetry(DEVICE, Utf8Bytes::from(text))
}

fn telemetry_path(c: &mut Criterion) {
    let clock = relay::RelayClock::default();
    let mut g = c.benchmark_group("telemetry_path");
    g.throughput(Throughput::Elements(1));
    for n in SUBSCRIBERS {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let (hub, pilots) = hub_with(n);
            let state = Mutex::new(DeviceTelemetry::default());
            {
                // A full clock window: 16 exchanges 10 s apart, 30-40 ms round trips.
                let mut st = state.lock();
                let t0 = clock.now_ms() - 170_000.0;
                for i in 0..16 {
                    let t1 = t0 + i as f64 * 10_000.0;
                    let rtt = 30.0 + (i % 5) as f64 * 2.5;
                    st.clock.add(t1, t1 + rtt / 2.0 - 1.5, t1 + rtt / 2.0 - 1.4, t1 + rtt + 0.1).unwrap();
                }
            }
            let mut sequence = 0u64;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let k = left.min(BATCH);
                    // The frames as they come off the socket, numbered in order (untimed).
                    let frames: Vec<Utf8Bytes> = (0..k)
                        .map(|_| {
                            sequence += 1;
                            Utf8Bytes::from(incoming(sequence))
                        })
                        .collect();
                    let start = Instant::now();
                    for f in &frames {
                        black_box(on_telemetry(&hub, &state, &clock, f));
                    }
                    total += start.elapsed();
                    assert_eq!(drain(&pilots), k as usize * n, "every frame reaches every subscriber");
                    left -= k;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short by default (about 30 s); pass `--warm-up-time` and `--measurement-time` for longer.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = publish, telemetry_path
}
criterion_main!(benches);
