//! A connection's outbound queue.
//!
//! Two lanes, because the two kinds of traffic fail differently:
//! - **control** (answers, errors, commands, signaling): never dropped. It is bounded; a peer
//!   that lets it fill has stopped reading, and the connection is closed as a slow consumer
//!   (logged and counted) instead of growing without limit.
//! - **telemetry**: bounded ring; when full the *oldest* frame is dropped, because a pilot wants
//!   the newest state. Drops are counted and reported to the pilot with `telemetry_dropped`
//!   before the next frame it does get.
//!
//! Producers never wait: pushing is a short lock and a wake-up, so a slow pilot can never slow
//! the device or the other pilots. The single consumer is the connection's writer task.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// What the writer should do next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Send this text frame.
    Text(Utf8Bytes),
    /// Telemetry was dropped; tell the peer (`count` since the last notice, `total` ever).
    Dropped {
        /// Since the last notice.
        count: u64,
        /// Since the connection opened.
        total: u64,
    },
    /// Send a close frame with this code and reason, then stop.
    Close(u16, String),
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
    /// The control lane overflowed; the connection is now closing as a slow consumer.
    #[error("outbound control queue full: peer is not reading")]
    Overflow,
}

#[derive(Debug, Default)]
struct State {
    control: VecDeque<Utf8Bytes>,
    telemetry: VecDeque<Utf8Bytes>,
    dropped_unreported: u64,
    dropped_total: u64,
    /// Set once: the close to send after the control lane drains.
    close: Option<(u16, String)>,
    /// The writer has finished (close sent or socket failed).
    done: bool,
}

/// The queue. Share it as `Arc<Outbox>`.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    wake_writer: Notify,
    writer_done: Notify,
    control_cap: usize,
    telemetry_cap: usize,
}

impl Outbox {
    /// A queue holding up to `control_cap` control messages and `telemetry_cap` frames.
    pub fn new(control_cap: usize, telemetry_cap: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            writer_done: Notify::new(),
            control_cap: control_cap.max(1),
            telemetry_cap: telemetry_cap.max(1),
        }
    }

    /// Queues a control message.
    pub fn push_control(&self, text: impl Into<Utf8Bytes>) -> Result<(), PushError> {
        let mut s = self.state.lock();
        if s.close.is_some() || s.done {
            return Err(PushError::Closed);
        }
        if s.control.len() >= self.control_cap {
            s.close = Some((1008, "slow_consumer: outbound queue full".into()));
            drop(s);
            self.wake_writer.notify_one();
            return Err(PushError::Overflow);
        }
        s.control.push_back(text.into());
        drop(s);
        self.wake_writer.notify_one();
        Ok(())
    }

    /// Queues a telemetry frame, dropping the oldest queued one if full. Returns whether a
    /// frame was dropped, or `Err` if the connection is closing.
    pub fn push_telemetry(&self, text: Utf8Bytes) -> Result<bool, PushError> {
        let mut s = self.state.lock();
        if s.close.is_some() || s.done {
            return Err(PushError::Closed);
        }
        let dropped = if s.telemetry.len() >= self.telemetry_cap {
            s.telemetry.pop_front();
            s.dropped_unreported += 1;
            s.dropped_total += 1;
            true
        } else {
            false
        };
        s.telemetry.push_back(text);
        drop(s);
        self.wake_writer.notify_one();
        Ok(dropped)
    }

    /// Asks the writer to close with `code` and `reason` once the control lane has drained.
    /// The first close wins.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let mut s = self.state.lock();
        if s.close.is_none() && !s.done {
            s.close = Some((code, reason.into()));
        }
        drop(s);
        self.wake_writer.notify_one();
    }

    /// True once a close was requested or the writer stopped.
    pub fn is_closing(&self) -> bool {
        let s = self.state.lock();
        s.close.is_some() || s.done
    }

    /// Frames dropped since the connection opened.
    pub fn dropped_total(&self) -> u64 {
        self.state.lock().dropped_total
    }

    /// Queued messages (control + telemetry).
    pub fn len(&self) -> usize {
        let s = self.state.lock();
        s.control.len() + s.telemetry.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The writer's next action; waits while there is nothing to do.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.wake_writer.notified();
            if let Some(n) = self.try_next() {
                return n;
            }
            notified.await;
        }
    }

    /// The next action if one is ready, without waiting.
    pub fn try_next(&self) -> Option<Next> {
        let mut s = self.state.lock();
        if let Some(t) = s.control.pop_front() {
            return Some(Next::Text(t));
        }
        if let Some((code, reason)) = s.close.clone() {
            return Some(Next::Close(code, reason));
        }
        if s.dropped_unreported > 0 && !s.telemetry.is_empty() {
            let count = std::mem::take(&mut s.dropped_unreported);
            return Some(Next::Dropped { count, total: s.dropped_total });
        }
        s.telemetry.pop_front().map(Next::Text)
    }

    /// Called by the writer when it stops, for whatever reason. Wakes [`Outbox::done`].
    pub fn finish(&self) {
        let mut s = self.state.lock();
        s.done = true;
        s.control.clear();
        s.telemetry.clear();
        drop(s);
        self.writer_done.notify_waiters();
        self.writer_done.notify_one();
    }

    /// Resolves when the writer has stopped.
    pub async fn done(&self) {
        loop {
            let notified = self.writer_done.notified();
            if self.state.lock().done {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_owned())
    }

    #[tokio::test]
    async fn control_goes_before_telemetry_and_close_after_control() {
        let o = Outbox::new(8, 8);
        o.push_telemetry(t("tel")).unwrap();
        o.push_control(t("ctl")).unwrap();
        o.close(1000, "bye");
        assert_eq!(o.next().await, Next::Text(t("ctl")));
        assert_eq!(o.next().await, Next::Close(1000, "bye".into()));
        assert_eq!(o.push_control(t("late")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn telemetry_drops_oldest_and_reports_before_next_frame() {
        let o = Outbox::new(8, 2);
        assert_eq!(o.push_telemetry(t("1")), Ok(false));
        assert_eq!(o.push_telemetry(t("2")), Ok(false));
        assert_eq!(o.push_telemetry(t("3")), Ok(true));
        assert_eq!(o.push_telemetry(t("4")), Ok(true));
        assert_eq!(o.next().await, Next::Dropped { count: 2, total: 2 });
        assert_eq!(o.next().await, Next::Text(t("3")));
        assert_eq!(o.next().await, Next::Text(t("4")));
        assert_eq!(o.dropped_total(), 2);
    }

    #[tokio::test]
    async fn control_overflow_closes_as_slow_consumer() {
        let o = Outbox::new(2, 2);
        o.push_control(t("a")).unwrap();
        o.push_control(t("b")).unwrap();
        assert_eq!(o.push_control(t("c")), Err(PushError::Overflow));
        assert_eq!(o.next().await, Next::Text(t("a")));
        assert_eq!(o.next().await, Next::Text(t("b")));
        assert!(matches!(o.next().await, Next::Close(1008, _)));
    }

    #[tokio::test]
    async fn writer_wakes_on_push_and_done_resolves() {
        let o = std::sync::Arc::new(Outbox::new(4, 4));
        let o2 = o.clone();
        let h = tokio::spawn(async move { o2.next().await });
        tokio::task::yield_now().await;
        o.push_control(t("x")).unwrap();
        assert_eq!(h.await.unwrap(), Next::Text(t("x")));
        let o3 = o.clone();
        let waiter = tokio::spawn(async move { o3.done().await });
        o.finish();
        waiter.await.unwrap();
        assert!(o.is_closing());
    }
}
