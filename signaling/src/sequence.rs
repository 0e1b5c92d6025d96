//! Per-stream sequence checking.
//!
//! A device numbers the frames of each telemetry stream 0, 1, 2, ... The relay feeds every
//! frame's number to a [`StreamSequence`] and gets a [`Verdict`]:
//!
//! | verdict | when |
//! |---|---|
//! | `Ok` | the first frame, or exactly one more than the highest seen |
//! | `Gap { missing }` | more than one ahead: `missing` frames were skipped |
//! | `Reordered` | behind the highest, inside the window, and not seen before: it fills a gap |
//! | `Duplicate` | behind the highest, inside the window, and already seen |
//! | `Reset` | the device restarted its counter: a new `epoch`, or a live frame jumping back further than `reset_threshold` |
//!
//! Frames flagged as backfill (buffered while the link was down) are allowed to be as old as
//! the whole window without being taken for a reset. Frames older than the window are counted
//! as a reset, because no link reorders that far.
//!
//! Counters always add up: `frames == ok + gaps + duplicates + reordered + resets`, and
//! `lost == missing_total - reordered` (the property tests check both).

use std::collections::HashMap;
use std::hash::Hash;

/// How many recent sequence numbers are remembered per stream for duplicate detection.
pub const DEFAULT_WINDOW: u64 = 1024;
/// How far back a live (not backfilled) frame may jump before it is taken as a counter reset.
pub const DEFAULT_RESET_THRESHOLD: u64 = 64;

/// The sequence check's judgement on one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In order.
    Ok,
    /// Ahead of the expected number; `missing` frames were skipped.
    Gap {
        /// How many numbers were skipped.
        missing: u64,
    },
    /// Seen before.
    Duplicate,
    /// Late, but new: fills an earlier gap.
    Reordered,
    /// The device restarted its counter.
    Reset,
}

impl Verdict {
    /// The wire name used in telemetry annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Gap { .. } => "gap",
            Verdict::Duplicate => "duplicate",
            Verdict::Reordered => "reordered",
            Verdict::Reset => "reset",
        }
    }

    /// For `Gap`, the count missing.
    pub fn missing(self) -> Option<u64> {
        match self {
            Verdict::Gap { missing } => Some(missing),
            _ => None,
        }
    }
}

/// Running totals for one stream (or, summed, for many).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceCounters {
    /// Frames observed.
    pub frames: u64,
    /// Frames judged `Ok`.
    pub ok: u64,
    /// Frames judged `Gap`.
    pub gaps: u64,
    /// Sum of `missing` over all gaps.
    pub missing_total: u64,
    /// Frames judged `Duplicate`.
    pub duplicates: u64,
    /// Frames judged `Reordered`.
    pub reordered: u64,
    /// Frames judged `Reset`.
    pub resets: u64,
    /// Frames still missing: `missing_total - reordered`.
    pub lost: u64,
}

impl SequenceCounters {
    fn record(&mut self, v: Verdict) {
        self.frames += 1;
        match v {
            Verdict::Ok => self.ok += 1,
            Verdict::Gap { missing } => {
                self.gaps += 1;
                self.missing_total += missing;
                self.lost += missing;
            }
            Verdict::Duplicate => self.duplicates += 1,
            Verdict::Reordered => {
                self.reordered += 1;
                self.lost -= 1;
            }
            Verdict::Reset => self.resets += 1,
        }
    }

    /// Adds another stream's counters to these.
    pub fn add(&mut self, o: &SequenceCounters) {
        self.frames += o.frames;
        self.ok += o.ok;
        self.gaps += o.gaps;
        self.missing_total += o.missing_total;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.resets += o.resets;
        self.lost += o.lost;
    }
}

/// Sequence state of one stream.
#[derive(Debug, Clone)]
pub struct StreamSequence {
    /// Highest sequence number seen in the current epoch; `None` before the first frame.
    max: Option<u64>,
    /// Lowest sequence number seen in the current epoch: numbers between it and `max` that
    /// were never seen are the lost ones.
    first: u64,
    /// The device's epoch (boot id) of the current counter, when it sends one.
    epoch: Option<String>,
    /// One bit per number in `(max - window, max]`, indexed by `seq % window`: seen or not.
    seen: Vec<u64>,
    window: u64,
    reset_threshold: u64,
    counters: SequenceCounters,
}

impl Default for StreamSequence {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW, DEFAULT_RESET_THRESHOLD)
    }
}

impl StreamSequence {
    /// A stream remembering `window` numbers (rounded up to a multiple of 64) and taking live
    /// jumps back of more than `reset_threshold` as a reset.
    pub fn new(window: u64, reset_threshold: u64) -> Self {
        let words = window.div_ceil(64).max(1);
        StreamSequence {
            max: None,
            first: 0,
            epoch: None,
            seen: vec![0; words as usize],
            window: words * 64,
            reset_threshold: reset_threshold.min(words * 64),
            counters: SequenceCounters::default(),
        }
    }

    /// Running totals.
    pub fn counters(&self) -> SequenceCounters {
        self.counters
    }

    /// Highest number seen in the current epoch.
    pub fn highest(&self) -> Option<u64> {
        self.max
    }

    fn bit(&self, seq: u64) -> (usize, u64) {
        let i = seq % self.window;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn is_seen(&self, seq: u64) -> bool {
        let (w, b) = self.bit(seq);
        self.seen[w] & b != 0
    }

    fn mark(&mut self, seq: u64) {
        let (w, b) = self.bit(seq);
        self.seen[w] |= b;
    }

    fn clear(&mut self, seq: u64) {
        let (w, b) = self.bit(seq);
        self.seen[w] &= !b;
    }

    fn restart(&mut self, seq: u64, epoch: Option<&str>) {
        self.seen.iter_mut().for_each(|w| *w = 0);
        self.max = Some(seq);
        self.first = seq;
        self.epoch = epoch.map(str::to_owned);
        self.mark(seq);
    }

    /// Judges one frame. `epoch` is the device's counter epoch if it sends one; `backfill` is
    /// true for frames the device buffered while offline.
    pub fn observe(&mut self, seq: u64, epoch: Option<&str>, backfill: bool) -> Verdict {
        let verdict = self.judge(seq, epoch, backfill);
        self.counters.record(verdict);
        verdict
    }

    fn judge(&mut self, seq: u64, epoch: Option<&str>, backfill: bool) -> Verdict {
        let Some(max) = self.max else {
            self.restart(seq, epoch);
            return Verdict::Ok;
        };
        if epoch.is_some() && epoch != self.epoch.as_deref() {
            self.restart(seq, epoch);
            return Verdict::Reset;
        }
        if seq > max {
            let ahead = seq - max;
            // Forget the numbers that slide out of the window: they are the new slots.
            let clear_from = if ahead >= self.window { seq + 1 - self.window } else { max + 1 };
            for s in clear_from..=seq {
                self.clear(s);
            }
            self.mark(seq);
            self.max = Some(seq);
            return if ahead == 1 { Verdict::Ok } else { Verdict::Gap { missing: ahead - 1 } };
        }
        let behind = max - seq;
        let limit = if backfill { self.window - 1 } else { self.reset_threshold };
        if behind > limit {
            self.restart(seq, epoch.or(self.epoch.clone().as_deref()));
            return Verdict::Reset;
        }
        if self.is_seen(seq) {
            return Verdict::Duplicate;
        }
        self.mark(seq);
        if seq < self.first {
            // Older than anything seen this epoch (e.g. backfill arriving after the first live
            // frame): the numbers between it and the old first frame become holes, and this
            // frame fills its own slot, so the totals stay exact.
            let extra = self.first - seq;
            self.counters.missing_total += extra;
            self.counters.lost += extra;
            self.first = seq;
        }
        Verdict::Reordered
    }
}

/// Sequence state for many streams, keyed by e.g. `(device, stream)`.
#[derive(Debug, Clone)]
pub struct SequenceTracker<K> {
    streams: HashMap<K, StreamSequence>,
}

impl<K> Default for SequenceTracker<K> {
    fn default() -> Self {
        SequenceTracker { streams: HashMap::new() }
    }
}

impl<K: Hash + Eq> SequenceTracker<K> {
    /// Judges one frame of stream `key`.
    pub fn observe(&mut self, key: K, seq: u64, epoch: Option<&str>, backfill: bool) -> (Verdict, SequenceCounters) {
        let s = self.streams.entry(key).or_default();
        let v = s.observe(seq, epoch, backfill);
        (v, s.counters())
    }

    /// Like [`SequenceTracker::observe`], but allocates the key only for a new stream.
    pub fn observe_ref<Q>(
        &mut self,
        key: &Q,
        seq: u64,
        epoch: Option<&str>,
        backfill: bool,
    ) -> (Verdict, SequenceCounters)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.streams.contains_key(key) {
            self.streams.insert(key.to_owned(), StreamSequence::default());
        }
        let s = self.streams.get_mut(key).expect("inserted above");
        let v = s.observe(seq, epoch, backfill);
        (v, s.counters())
    }

    /// One stream's state, if it has seen a frame.
    pub fn stream(&self, key: &K) -> Option<&StreamSequence> {
        self.streams.get(key)
    }

    /// Totals over every stream.
    pub fn totals(&self) -> SequenceCounters {
        let mut t = SequenceCounters::default();
        self.streams.values().for_each(|s| t.add(&s.counters()));
        t
    }

    /// Forgets streams for which `keep` is false (e.g. a deleted device's).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.streams.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(seqs: &[u64]) -> Vec<Verdict> {
        let mut s = StreamSequence::default();
        seqs.iter().map(|&q| s.observe(q, None, false)).collect()
    }

    #[test]
    fn in_order_is_ok() {
        assert_eq!(run(&[5, 6, 7]), vec![Verdict::Ok; 3]);
    }

    #[test]
    fn gap_reports_how_many_are_missing() {
        assert_eq!(run(&[1, 2, 5, 6]), vec![Verdict::Ok, Verdict::Ok, Verdict::Gap { missing: 2 }, Verdict::Ok]);
    }

    #[test]
    fn duplicate_is_detected() {
        assert_eq!(
            run(&[1, 2, 2, 3, 1]),
            vec![Verdict::Ok, Verdict::Ok, Verdict::Duplicate, Verdict::Ok, Verdict::Duplicate]
        );
    }

    #[test]
    fn reordered_fills_a_gap_then_repeats_are_duplicates() {
        let mut s = StreamSequence::default();
        assert_eq!(s.observe(1, None, false), Verdict::Ok);
        assert_eq!(s.observe(3, None, false), Verdict::Gap { missing: 1 });
        assert_eq!(s.counters().lost, 1);
        assert_eq!(s.observe(2, None, false), Verdict::Reordered);
        assert_eq!(s.counters().lost, 0);
        assert_eq!(s.observe(2, None, false), Verdict::Duplicate);
        assert_eq!(s.observe(4, None, false), Verdict::Ok);
    }

    #[test]
    fn reset_by_large_jump_back() {
        let mut seqs: Vec<u64> = (100..300).collect();
        seqs.push(0);
        seqs.push(1);
        let v = run(&seqs);
        assert_eq!(v[200], Verdict::Reset);
        assert_eq!(v[201], Verdict::Ok);
    }

    #[test]
    fn reset_by_new_epoch_even_for_small_numbers() {
        let mut s = StreamSequence::default();
        assert_eq!(s.observe(0, Some("boot-a"), false), Verdict::Ok);
        assert_eq!(s.observe(1, Some("boot-a"), false), Verdict::Ok);
        assert_eq!(s.observe(2, Some("boot-a"), false), Verdict::Ok);
        assert_eq!(s.observe(0, Some("boot-b"), false), Verdict::Reset);
        assert_eq!(s.observe(1, Some("boot-b"), false), Verdict::Ok);
        // The old epoch's numbers do not confuse the new one.
        assert_eq!(s.observe(2, Some("boot-b"), false), Verdict::Ok);
    }

    #[test]
    fn backfill_may_be_far_behind_without_reset() {
        let mut s = StreamSequence::default();
        s.observe(0, None, false);
        assert_eq!(s.observe(500, None, false), Verdict::Gap { missing: 499 });
        for q in 1..500 {
            assert_eq!(s.observe(q, None, true), Verdict::Reordered, "seq {q}");
        }
        assert_eq!(s.counters().lost, 0);
        // The same jump back for a live frame is a reset.
        assert_eq!(s.observe(100, None, false), Verdict::Reset);
    }

    #[test]
    fn frames_older_than_the_first_are_late_not_duplicates() {
        // The relay restarted: the first frame it sees is live 10, then backfill 7..9 arrives.
        let mut s = StreamSequence::default();
        s.observe(10, None, false);
        assert_eq!(s.observe(7, None, true), Verdict::Reordered);
        assert_eq!(s.counters().lost, 2, "8 and 9 are still missing");
        assert_eq!(s.observe(8, None, true), Verdict::Reordered);
        assert_eq!(s.observe(9, None, true), Verdict::Reordered);
        assert_eq!(s.counters().lost, 0);
        assert_eq!(s.observe(8, None, true), Verdict::Duplicate);
    }

    #[test]
    fn window_slides_so_old_bits_do_not_leak() {
        let mut s = StreamSequence::new(64, 64);
        for q in 0..64 {
            s.observe(q, None, false);
        }
        // 128 sits on 0's slot; 64..127 are skipped.
        assert_eq!(s.observe(128, None, false), Verdict::Gap { missing: 64 });
        assert_eq!(s.observe(127, None, true), Verdict::Reordered);
        assert_eq!(s.observe(127, None, true), Verdict::Duplicate);
    }

    #[test]
    fn tracker_keeps_streams_apart() {
        let mut t = SequenceTracker::default();
        assert_eq!(t.observe(("d", "gps"), 1, None, false).0, Verdict::Ok);
        assert_eq!(t.observe(("d", "imu"), 7, None, false).0, Verdict::Ok);
        assert_eq!(t.observe(("d", "gps"), 3, None, false).0, Verdict::Gap { missing: 1 });
        assert_eq!(t.totals().frames, 3);
        assert_eq!(t.totals().lost, 1);
    }

    proptest! {
        #[test]
        fn counters_always_add_up(ops in prop::collection::vec((0u64..3000, any::<bool>(), 0u8..3), 1..400)) {
            let mut s = StreamSequence::new(256, 32);
            for (seq, backfill, epoch) in ops {
                let epoch = ["a", "b", "c"][epoch as usize];
                s.observe(seq, Some(epoch), backfill);
                let c = s.counters();
                prop_assert_eq!(c.frames, c.ok + c.gaps + c.duplicates + c.reordered + c.resets);
                prop_assert_eq!(c.lost, c.missing_total - c.reordered);
            }
        }

        #[test]
        fn without_resets_lost_is_exactly_the_numbers_never_seen(
            ops in prop::collection::vec(0u64..200, 1..300)
        ) {
            // Walk forward from 0 with random skips, repeats and late arrivals inside the
            // reset threshold, then compare with ground truth.
            let mut s = StreamSequence::new(1024, 1024);
            let mut seen = std::collections::BTreeSet::new();
            for &q in &ops {
                let v = s.observe(q, None, true);
                prop_assert_eq!(v == Verdict::Duplicate, !seen.insert(q));
            }
            let c = s.counters();
            let max = *seen.iter().next_back().unwrap();
            let min = *seen.iter().next().unwrap();
            let expected_lost = (max - min + 1) - seen.len() as u64;
            prop_assert_eq!(c.resets, 0);
            prop_assert_eq!(c.lost, expected_lost);
        }
    }
}
