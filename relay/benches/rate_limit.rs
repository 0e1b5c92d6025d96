//! The per-message rate-limit check: [`relay::limits::ConnLimiter::admit`], the call the relay
//! makes for every text frame a connection sends, before parsing it (`conn.rs`, `on_message`).
//! It checks two governor limiters, messages per second and bytes per second.
//!
//! - `admit/allowed`: both limiters have room (a limiter with quotas far above what the loop
//!   can reach, rebuilt for every sample), so the message is admitted: two GCRA checks.
//! - `admit/refused_messages`: the message limiter's burst is used up (the relay's defaults,
//!   200 messages/s with a burst of 400): refused at the first check, with the wait computed.
//! - `admit/refused_bytes`: messages are allowed but the byte limiter's burst is used up:
//!   the message check passes, the byte check refuses.
//!
//! Each admits a 358-byte frame, the size of the parse benchmark's telemetry frame.
//!
//! Run: `cargo bench -p tether-relay --bench rate_limit` (docs/benchmarks.md).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use relay::limits::{ConnLimiter, Defaults, Limits, Overrides};

const FRAME_LEN: usize = 358;

/// The relay's default limits (`relay/src/config.rs`).
fn limits() -> Limits {
    Limits::new(Defaults {
        messages_per_second: 200,
        bytes_per_second: 2 << 20,
        connections_per_minute: 30,
        auth_failures_per_minute: 10,
    })
}

/// Admits until the limiter refuses, so that the next checks start refused.
fn exhaust(l: &mut ConnLimiter) {
    let mut n = 0;
    while l.admit(FRAME_LEN).is_ok() {
        n += 1;
        assert!(n < 10_000_000, "the limiter never refused");
    }
}

/// Times `iters` admits on `l`, and returns the time and how many were admitted.
fn run(l: &mut ConnLimiter, iters: u64) -> (Duration, u64) {
    let mut admitted = 0u64;
    let start = Instant::now();
    for _ in 0..iters {
        admitted += black_box(l.admit(black_box(FRAME_LEN))).is_ok() as u64;
    }
    (start.elapsed(), admitted)
}

fn admit(c: &mut Criterion) {
    let limits = limits();
    let mut g = c.benchmark_group("admit");
    g.bench_function("allowed", |b| {
        // 10^9 messages/s and about 2 GB/s, bursts twice that. A fresh limiter for every
        // million admits (358 MB) keeps them far from exhausted however long the sample.
        let generous = Overrides {
            messages_per_second: Some(1_000_000_000),
            bytes_per_second: Some(u32::MAX / 2),
            ..Overrides::default()
        };
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(1_000_000);
                let mut l = limits.for_connection(&generous);
                let (t, admitted) = run(&mut l, n);
                assert_eq!(admitted, n, "every message should have been admitted");
                total += t;
                left -= n;
            }
            total
        })
    });
    g.bench_function("refused_messages", |b| {
        b.iter_custom(|iters| {
            let mut l = limits.for_connection(&Overrides::default());
            exhaust(&mut l);
            let (t, admitted) = run(&mut l, iters);
            // At 200/s, a handful get through during a sample of some milliseconds; never more
            // than the burst (400), however long the machine stalls.
            assert!(admitted <= 400 + iters / 100, "{admitted} of {iters} admitted");
            t
        })
    });
    g.bench_function("refused_bytes", |b| {
        let bytes_limited = Overrides {
            messages_per_second: Some(1_000_000_000),
            bytes_per_second: Some(1000),
            ..Overrides::default()
        };
        b.iter_custom(|iters| {
            let mut l = limits.for_connection(&bytes_limited);
            exhaust(&mut l);
            let (t, admitted) = run(&mut l, iters);
            assert!(admitted <= 400 + iters / 100, "{admitted} of {iters} admitted");
            t
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short by default (about 15 s); pass `--warm-up-time` and `--measurement-time` for longer.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = admit
}
criterion_main!(benches);
