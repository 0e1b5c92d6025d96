//! Parsing incoming frames: serde_json against simd-json, on the relay's hot path.
//!
//! The hot path is a device's telemetry frame (about 300 bytes) that the relay must read
//! (type, sequence, timestamp, stream, epoch) and forward to pilots with its annotation. Four
//! ways to do it are measured, each including everything the relay would have to do:
//!
//! - `serde_json/two_step`: what the relay uses ([`signaling::message::decode_frame`]): parse
//!   the envelope with the payload left raw, parse only the header fields, splice the raw
//!   payload into the forwarded frame;
//! - `serde_json/derive`: serde's derived `Envelope` (payload fully materialised), re-serialised;
//! - `simd_json/derive`: simd-json's serde deserializer into the same `Envelope` (it parses in
//!   place, so the frame is copied into a mutable buffer first), re-serialised;
//! - `simd_json/tape`: simd-json's borrowed value (no serde), fields read from it, the payload
//!   re-encoded by simd-json and the annotation spliced in.
//!
//! Run: `cargo bench -p tether-signaling --bench parse` (docs/benchmarks.md).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use signaling::Envelope;
use signaling::message::{self, Body, Frame, TelemetryAnnotation};
use simd_json::prelude::*;
use std::hint::black_box;
use std::time::Duration;

const TELEMETRY: &str = r#"{"type":"telemetry","payload":{"subtype":"sensor_data","sequence":123456,"timestamp":1732262400123,"system_time":1732262400125,"epoch":"9f2c41aa","data":{"gps":{"latitude":37.808123,"longitude":-122.417745,"heading":225.5,"speed":2.31},"battery":{"percent":81.5,"voltage":12.3},"status":"autonomous_navigation","water":{"temperature":14.2,"salinity":33.1}}}}"#;
const COMMAND: &str = r#"{"type":"execute_command","correlationID":"cmd-xyz123","clientID":"client-abc-123","payload":{"command":"ls","args":["-l","/home/user"],"timeoutMs":5000}}"#;

fn annotation(seq: u64, ts: f64) -> TelemetryAnnotation {
    TelemetryAnnotation {
        received_at: ts + 35.0,
        stream: "sensor_data".into(),
        verdict: if seq > 0 { "ok".into() } else { "gap".into() },
        missing: None,
        lost_total: 0,
        age_ms: Some(35.0),
        clock_offset_ms: Some(-1.5),
        clock_uncertainty_ms: Some(0.8),
        replay: false,
    }
}

fn telemetry(c: &mut Criterion) {
    let mut g = c.benchmark_group("telemetry_forward");
    g.throughput(Throughput::Bytes(TELEMETRY.len() as u64));
    g.bench_function("serde_json/two_step", |b| {
        b.iter(|| {
            let Ok(Frame::Telemetry { header, payload, .. }) = message::decode_frame(black_box(TELEMETRY)) else {
                unreachable!()
            };
            let ann = annotation(header.sequence, header.timestamp);
            black_box(message::encode_forwarded_telemetry("boat-1", payload, &ann))
        })
    });
    g.bench_function("serde_json/derive", |b| {
        b.iter(|| {
            let mut env: Envelope = serde_json::from_str(black_box(TELEMETRY)).unwrap();
            let Body::Telemetry(t) = &mut env.body else { unreachable!() };
            t.relay = Some(annotation(t.sequence, t.timestamp));
            env.from = Some("boat-1".into());
            black_box(serde_json::to_string(&env).unwrap())
        })
    });
    g.bench_function("simd_json/derive", |b| {
        b.iter(|| {
            let mut buf = black_box(TELEMETRY).as_bytes().to_vec();
            let mut env: Envelope = simd_json::serde::from_slice(&mut buf).unwrap();
            let Body::Telemetry(t) = &mut env.body else { unreachable!() };
            t.relay = Some(annotation(t.sequence, t.timestamp));
            env.from = Some("boat-1".into());
            black_box(serde_json::to_string(&env).unwrap())
        })
    });
    g.bench_function("simd_json/tape", |b| {
        b.iter(|| {
            let mut buf = black_box(TELEMETRY).as_bytes().to_vec();
            let v = simd_json::to_borrowed_value(&mut buf).unwrap();
            assert_eq!(v.get_str("type"), Some("telemetry"));
            let p = v.get("payload").unwrap();
            let seq = p.get_u64("sequence").unwrap();
            let ts = p.get("timestamp").and_then(|t| t.cast_f64()).unwrap();
            let _stream = p.get_str("stream").or(p.get_str("subtype")).unwrap_or("sensor_data");
            let _epoch = p.get_str("epoch");
            let ann = serde_json::to_string(&annotation(seq, ts)).unwrap();
            let raw = p.encode();
            let mut out = String::with_capacity(raw.len() + ann.len() + 48);
            out.push_str("{\"type\":\"telemetry\",\"from\":\"boat-1\",\"payload\":");
            out.push_str(&raw[..raw.len() - 1]);
            out.push_str(",\"relay\":");
            out.push_str(&ann);
            out.push_str("}}");
            black_box(out)
        })
    });
    g.finish();
}

fn command(c: &mut Criterion) {
    let mut g = c.benchmark_group("command_decode");
    g.throughput(Throughput::Bytes(COMMAND.len() as u64));
    g.bench_function("serde_json/two_step", |b| b.iter(|| black_box(message::decode(black_box(COMMAND)).unwrap())));
    g.bench_function("serde_json/derive", |b| {
        b.iter(|| black_box(serde_json::from_str::<Envelope>(black_box(COMMAND)).unwrap()))
    });
    g.bench_function("simd_json/derive", |b| {
        b.iter(|| {
            let mut buf = black_box(COMMAND).as_bytes().to_vec();
            black_box(simd_json::serde::from_slice::<Envelope>(&mut buf).unwrap())
        })
    });
    g.finish();
}

fn sequence(c: &mut Criterion) {
    let mut g = c.benchmark_group("sequence_tracker");
    // One stream, every frame one more than the last: `Ok`, the common case.
    g.bench_function("observe_in_order", |b| {
        let mut t = signaling::SequenceTracker::<String>::default();
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            black_box(t.observe_ref("sensor_data", seq, Some("e"), false))
        })
    });
    // Every frame two ahead of the last (1, 3, 5, ...): `Gap { missing: 1 }` each time, which
    // also clears the skipped number's slot in the window.
    g.bench_function("observe_gap", |b| {
        let mut t = signaling::SequenceTracker::<String>::default();
        let mut seq = 0u64;
        b.iter(|| {
            seq += 2;
            black_box(t.observe_ref("sensor_data", seq, Some("e"), false))
        })
    });
    // Pairs swapped on the way (2, 1, 4, 3, ...): a `Gap` then the `Reordered` frame filling it.
    // One iteration is one frame, alternating between the two verdicts.
    g.bench_function("observe_out_of_order", |b| {
        let mut t = signaling::SequenceTracker::<String>::default();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let seq = if n % 2 == 1 { n + 1 } else { n - 1 };
            black_box(t.observe_ref("sensor_data", seq, Some("e"), false))
        })
    });
    // 64 streams on one device, frames arriving round-robin, each in order on its stream: the
    // lookup is a hash of the stream name in a map of 64.
    g.bench_function("observe_64_streams", |b| {
        let names: Vec<String> = (0..64).map(|i| format!("stream_{i:02}")).collect();
        let mut t = signaling::SequenceTracker::<String>::default();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let name = names[(n % 64) as usize].as_str();
            black_box(t.observe_ref(name, n / 64 + 1, Some("e"), false))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short by default (about 40 s for the whole file); pass `--warm-up-time` and
    // `--measurement-time` for longer runs.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = telemetry, command, sequence
}
criterion_main!(benches);
