//! The agent's core: one task that owns the relay link and everything that must survive it.
//!
//! The link (connect, authenticate, read) is driven from a single select loop; writes go
//! through a writer task with a small queue, so a stalled 4G link never blocks the loop.
//! While the link is down the loop keeps running: telemetry frames go to a bounded backlog
//! (sent after the reconnect, marked `backfill`, at `telemetry.backfillRate` behind live
//! frames), replies and events wait in a queue, supervised processes keep running, and the
//! safety stop watches the outage.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value, json};
use signaling::message::{
    self, AuthOk, Body, CommandOutput, CommandResult, LogLine, Pong, SafetyStop, Telemetry, TimeSyncResponse,
};
use signaling::{Envelope, ErrorCode};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util_shim::Cancel;

use crate::commands::{self, Dedupe, Seen};
use crate::config::{BufferPolicy, Config};
use crate::local::{LocalApi, LocalConfig, LocalEvent};
use crate::net::Socket;
use crate::safety::{self, Safety};
use crate::sim::Boat;
use crate::supervise::{ControlAction, ControlError, Supervisor, SupervisorEvent};
use crate::sysmetrics::SystemMetrics;

/// Why the agent stopped for good (as opposed to reconnecting).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The relay refused the credentials: retrying cannot help.
    #[error("the relay refused this device's credentials ({code}): {message}")]
    Refused {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The configuration cannot work (e.g. no credentials yet).
    #[error("{0}")]
    Config(String),
    /// An admin rejected this device's registration.
    #[error("an admin rejected this device's registration request {0}")]
    Rejected(String),
    /// `maxReconnectAttempts` consecutive attempts failed.
    #[error("gave up after {attempts} failed connection attempts; last error: {last}")]
    GaveUp {
        /// How many attempts failed in a row.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

/// Device wall clock, ms since the Unix epoch, with sub-millisecond precision.
pub fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

/// Minimal cancellation without pulling in tokio-util: a watch channel.
pub mod tokio_util_shim {
    use tokio::sync::watch;

    /// A cancellation signal that can be cloned and awaited.
    #[derive(Debug, Clone)]
    pub struct Cancel {
        rx: watch::Receiver<bool>,
    }

    /// The side that fires a [`Cancel`].
    #[derive(Debug)]
    pub struct Trigger(watch::Sender<bool>);

    impl Trigger {
        /// Fires the signal.
        pub fn cancel(&self) {
            let _ = self.0.send(true);
        }
    }

    /// A new signal and its trigger.
    pub fn cancel_pair() -> (Trigger, Cancel) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Cancel { rx })
    }

    impl Cancel {
        /// Resolves once cancelled.
        pub async fn cancelled(&mut self) {
            let _ = self.rx.wait_for(|c| *c).await;
        }

        /// Whether it has fired.
        pub fn is_cancelled(&self) -> bool {
            *self.rx.borrow()
        }
    }
}

/// Longest wait between reconnect attempts (unless `reconnectInterval` is longer).
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Messages the writer task holds; beyond it live frames go to the backlog and replies wait.
const WRITER_QUEUE: usize = 64;
/// Replies and events kept while the link is down.
const PENDING_MAX: usize = 10_000;
/// Log lines kept while the link is down (the oldest are dropped first).
const PENDING_LOGS_MAX: usize = 2_000;
/// Log lines forwarded per second at most; the rest are dropped and counted.
const LOG_LINES_PER_SECOND: u32 = 100;

/// What goes to the relay.
#[derive(Debug)]
enum Out {
    /// A telemetry frame; `system_time` is stamped when it is written.
    Frame(Box<Telemetry>),
    /// Any other message, already encoded.
    Text(String),
}

/// What the writer task hands back when it stops: what it had not sent yet.
#[derive(Debug)]
struct WriterEnd {
    rx: mpsc::Receiver<Out>,
    in_flight: Option<Out>,
    error: Option<String>,
}

/// An authenticated relay link.
struct Link {
    rx: SplitStream<Socket>,
    tx: mpsc::Sender<Out>,
    stop: Option<oneshot::Sender<bool>>,
    writer: tokio::task::JoinHandle<WriterEnd>,
    last_rx: Instant,
}

/// Work finished off the loop (commands, speed tests, docker) reporting back.
#[derive(Debug)]
enum Internal {
    /// An intermediate message (e.g. `command_progress`).
    Send(String),
    /// The final reply to the request with this correlation ID.
    Final { correlation_id: Option<String>, text: String },
}

/// An app command waiting for the robot software's answer.
#[derive(Debug)]
struct Waiting {
    /// The relay's correlation ID (None if the request had none).
    correlation_id: Option<String>,
    from: Option<String>,
    deadline: Instant,
}

/// An app command that arrived while no robot software was connected, held for one to
/// connect (see [`Agent::may_hold`]).
#[derive(Debug)]
struct Held {
    /// The ID the robot will see (the relay's correlation ID, or `agent-<n>`).
    local_id: String,
    /// The relay's correlation ID (None if the request had none).
    correlation_id: Option<String>,
    from: Option<String>,
    command: String,
    data: Value,
    /// When it arrived; `deadline` is `commands.appCommandTimeout` later.
    arrived: Instant,
    deadline: Instant,
}

/// What the relay's envelope says about how a request reached the agent beyond what
/// [`message::decode_from_relay`] keeps: the offline queue's top-level mark (protocol 12.3) and
/// a payload's `"queue": false` (the sender wants no late delivery, protocol 4.20).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Delivery {
    /// `"_offline_queued": true`: pushed from the relay's offline queue at this login.
    offline_queued: bool,
    /// `"queue": false` in the payload.
    refuses_lateness: bool,
}

impl Delivery {
    /// Reads the marks from a message's text (anything unreadable counts as unmarked).
    fn of(text: &str) -> Delivery {
        #[derive(serde::Deserialize)]
        struct Marks {
            #[serde(rename = "_offline_queued", default)]
            offline_queued: Value,
            #[serde(default)]
            payload: PayloadMarks,
        }
        #[derive(serde::Deserialize, Default)]
        struct PayloadMarks {
            #[serde(default)]
            queue: Value,
        }
        match serde_json::from_str::<Marks>(text) {
            Ok(m) => Delivery {
                offline_queued: m.offline_queued == Value::Bool(true),
                refuses_lateness: m.payload.queue == Value::Bool(false),
            },
            Err(_) => Delivery::default(),
        }
    }
}

/// Everything the loop waits for, in one place.
enum Event {
    Cancelled,
    Connected(Box<Result<(Socket, AuthOk), SessionEnd>>),
    Retry,
    Ws(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    WriterStopped(Result<WriterEnd, tokio::task::JoinError>),
    Dead,
    Local(LocalEvent),
    Supervisor(SupervisorEvent),
    Internal(Internal),
    Simulator,
    SystemMetrics,
    Backfill,
    Flush(mpsc::OwnedPermit<Out>),
    SafetyDue,
    AppDue,
}

/// The agent's state, kept across reconnects.
pub struct Agent {
    config: Config,
    /// Changes every process start, so the relay tells a restart from duplicates.
    epoch: String,
    /// Next sequence number per stream.
    sequences: HashMap<String, u64>,
    boat: Boat,
    last_step: Instant,
    metrics: SystemMetrics,
    /// Where config.yaml lives, to store credentials and config updates.
    config_path: Option<PathBuf>,
    /// TLS client settings, built on first use.
    tls: std::sync::OnceLock<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Frames produced while the link was down or full, oldest first.
    backlog: VecDeque<Telemetry>,
    /// Frames the backlog had to drop (by policy) since the agent started.
    backlog_dropped: u64,
    /// Replies and events waiting for the link.
    pending: VecDeque<String>,
    /// Log lines waiting for the link.
    pending_logs: VecDeque<String>,
    log_budget: (Instant, u32),
    logs_dropped: u64,
    dedupe: Dedupe,
    safety: Safety,
    waiting: HashMap<String, Waiting>,
    /// App commands waiting for robot software to connect, in arrival order.
    held: VecDeque<Held>,
    /// When the agent started running (app commands may wait for the robot software's first
    /// connection this long after it).
    started: Instant,
    /// Whether robot software has connected since the agent started.
    robot_seen: bool,
    local_ids: u64,
    /// Shared with the tasks that carry out `process_command` (a stop can take seconds).
    supervisor: Option<std::sync::Arc<Supervisor>>,
    local: Vec<LocalApi>,
    link: Option<Link>,
    internal: Option<mpsc::Sender<Internal>>,
    /// Set when a config change needs the tickers rebuilt.
    retune: bool,
    /// The video task, once running.
    #[cfg(feature = "video")]
    video: Option<crate::video::VideoService>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("client_id", &self.config.client_id)
            .field("link_up", &self.link.is_some())
            .field("backlog", &self.backlog.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent for `config`.
    pub fn new(config: Config) -> Self {
        let epoch = format!("{:08x}", rand::rng().random::<u32>());
        Agent {
            dedupe: Dedupe::new(config.commands.remember),
            safety: Safety::new(config.safety.clone()),
            config,
            epoch,
            sequences: HashMap::new(),
            boat: Boat::default(),
            last_step: Instant::now(),
            metrics: SystemMetrics::default(),
            config_path: None,
            tls: Default::default(),
            backlog: VecDeque::new(),
            backlog_dropped: 0,
            pending: VecDeque::new(),
            pending_logs: VecDeque::new(),
            log_budget: (Instant::now(), 0),
            logs_dropped: 0,
            waiting: HashMap::new(),
            held: VecDeque::new(),
            started: Instant::now(),
            robot_seen: false,
            local_ids: 0,
            supervisor: None,
            local: Vec::new(),
            link: None,
            internal: None,
            retune: true,
            #[cfg(feature = "video")]
            video: None,
        }
    }

    /// Saves credentials received at onboarding and config updates to this file.
    pub fn with_config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_path = Some(path.into());
        self
    }

    /// The configuration in use (credentials included once onboarded).
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn url(&self) -> Result<url::Url, AgentError> {
        let mut u = url::Url::parse(&self.config.server_address)
            .map_err(|e| AgentError::Config(format!("serverAddress: {e}")))?;
        u.query_pairs_mut().append_pair("clientID", &self.config.client_id);
        Ok(u)
    }

    /// Runs until `cancel` fires or the relay refuses the credentials: onboards if needed,
    /// starts the supervised processes and the local inputs, and keeps the relay link up,
    /// reconnecting with exponential backoff (with jitter) after every failure.
    pub async fn run(&mut self, mut cancel: Cancel) -> Result<(), AgentError> {
        if self.config.client_id.is_empty() {
            tokio::select! {
                r = self.onboard() => r?,
                _ = cancel.cancelled() => return Ok(()),
            }
        }
        self.started = Instant::now();
        let (internal_tx, mut internal_rx) = mpsc::channel(1024);
        self.internal = Some(internal_tx);
        let (local_tx, mut local_rx) = mpsc::channel(1024);
        self.local = self.bind_local(local_tx.clone()).await;
        #[cfg(feature = "video")]
        {
            let (vtx, mut vrx) = mpsc::channel::<String>(1024);
            let internal = self.internal_tx();
            tokio::spawn(async move {
                while let Some(text) = vrx.recv().await {
                    if internal.send(Internal::Send(text)).await.is_err() {
                        break;
                    }
                }
            });
            self.video = Some(crate::video::VideoService::start(self.config.video.clone(), vtx));
        }
        let (sup_tx, mut sup_rx) = mpsc::channel(1024);
        self.supervisor = Some(std::sync::Arc::new(Supervisor::start(
            self.config.paths.clone(),
            self.config.command_restart_max_delay.value,
            sup_tx,
        )));
        let result = self.drive(&mut cancel, &mut internal_rx, &mut local_rx, &mut sup_rx).await;
        drop(local_tx);
        if let Some(s) = self.supervisor.take() {
            s.shutdown().await;
        }
        for l in std::mem::take(&mut self.local) {
            l.shutdown().await;
        }
        result
    }

    /// Binds the local inputs, each on its own so one that cannot start (say, a port in use)
    /// does not take the other down; the failure is logged with its cause.
    async fn bind_local(&self, events: mpsc::Sender<LocalEvent>) -> Vec<LocalApi> {
        let t = &self.config.telemetry;
        let mut out = Vec::new();
        if !t.udp.is_empty() {
            match t.udp.parse() {
                Ok(addr) => match LocalApi::bind(&LocalConfig { udp: Some(addr), unix: None }, events.clone()).await {
                    Ok(l) => {
                        tracing::info!(addr = ?l.udp_addr(), "local telemetry input (UDP JSON datagrams) ready");
                        out.push(l);
                    }
                    Err(e) => tracing::error!("{e}; running without the UDP input"),
                },
                Err(_) => tracing::error!("telemetry.udp {:?} is not an address", t.udp),
            }
        }
        if !t.unix_socket.is_empty() {
            let cfg = LocalConfig { udp: None, unix: Some(PathBuf::from(&t.unix_socket)) };
            match LocalApi::bind(&cfg, events).await {
                Ok(l) => {
                    tracing::info!(path = %t.unix_socket, "local robot socket (JSON lines) ready");
                    out.push(l);
                }
                Err(e) => tracing::error!("{e}; running without the robot socket"),
            }
        }
        out
    }

    fn robots_connected(&self) -> usize {
        self.local.iter().map(LocalApi::robots_connected).sum()
    }

    fn broadcast(&self, msg: &Value) -> usize {
        self.local.iter().map(|l| l.broadcast(msg)).sum()
    }

    /// The loop: every event the agent reacts to, link up or down.
    async fn drive(
        &mut self,
        cancel: &mut Cancel,
        internal_rx: &mut mpsc::Receiver<Internal>,
        local_rx: &mut mpsc::Receiver<LocalEvent>,
        sup_rx: &mut mpsc::Receiver<SupervisorEvent>,
    ) -> Result<(), AgentError> {
        let start = Duration::from_secs_f64(self.config.reconnect_interval);
        let max_wait = BACKOFF_MAX.max(start);
        let mut backoff = start;
        // Consecutive attempts that did not reach `auth_ok`.
        let mut failures = 0u32;
        let mut connecting = Some(self.connect());
        let mut retry_at: Option<Instant> = None;
        let mut sim: Option<tokio::time::Interval> = None;
        let mut sys: Option<tokio::time::Interval> = None;
        let mut backfill = tokio::time::interval(Duration::from_secs(1));
        loop {
            if std::mem::take(&mut self.retune) {
                let t = &self.config.telemetry;
                sim = t.simulator.then(|| ticker(Duration::from_secs_f64(1.0 / t.rate_hz)));
                sys = t.system_metrics.then(|| ticker(t.system_interval.value));
                backfill = ticker(Duration::from_secs_f64(1.0 / t.backfill_rate));
            }
            let dead_after = Duration::from_secs_f64(self.config.connection_timeout);
            let safety_due = self.safety.next_deadline();
            let app_due = self.waiting.values().map(|w| w.deadline).chain(self.held.iter().map(|h| h.deadline)).min();
            let link = self.link.as_mut();
            let dead_at = link.as_ref().map(|l| l.last_rx + dead_after);
            let wants_flush = !self.pending.is_empty() || !self.pending_logs.is_empty();
            let flush_tx = link.as_ref().filter(|_| wants_flush).map(|l| l.tx.clone());
            let backfill_on = !self.backlog.is_empty()
                && link.as_ref().is_some_and(|l| l.tx.capacity() > WRITER_QUEUE / 2 && !wants_flush);
            let (ws_rx, writer) = match link {
                Some(l) => (Some(&mut l.rx), Some(&mut l.writer)),
                None => (None, None),
            };
            let retry = retry_at.filter(|_| connecting.is_none());
            let event = tokio::select! {
                _ = cancel.cancelled() => Event::Cancelled,
                r = opt(connecting.as_mut()) => Event::Connected(Box::new(r)),
                _ = sleep_opt(retry) => Event::Retry,
                m = next_opt(ws_rx) => Event::Ws(m),
                r = opt(writer) => Event::WriterStopped(r),
                _ = sleep_opt(dead_at) => Event::Dead,
                Some(i) = internal_rx.recv() => Event::Internal(i),
                Some(e) = local_rx.recv() => Event::Local(e),
                Some(e) = sup_rx.recv() => Event::Supervisor(e),
                Some(p) = reserve_opt(flush_tx) => Event::Flush(p),
                _ = tick_opt(sim.as_mut()) => Event::Simulator,
                _ = tick_opt(sys.as_mut()) => Event::SystemMetrics,
                _ = backfill.tick(), if backfill_on => Event::Backfill,
                _ = sleep_opt(safety_due) => Event::SafetyDue,
                _ = sleep_opt(app_due) => Event::AppDue,
            };
            match event {
                Event::Cancelled => {
                    if let Some(mut l) = self.link.take() {
                        // Say goodbye properly: the writer sends a close frame.
                        if let Some(stop) = l.stop.take() {
                            let _ = stop.send(true);
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut l.writer).await;
                    }
                    return Ok(());
                }
                Event::Connected(result) => {
                    connecting = None;
                    match *result {
                        Ok((ws, ok)) => {
                            tracing::info!(client_id = %ok.client_id, org = %ok.org, "authenticated with the relay");
                            failures = 0;
                            backoff = start;
                            self.link_up(ws, dead_after);
                        }
                        Err(SessionEnd::Refused(code, message)) => return Err(AgentError::Refused { code, message }),
                        Err(SessionEnd::Lost(why)) => {
                            failures += 1;
                            let max = self.config.max_reconnect_attempts;
                            if max > 0 && failures >= max {
                                return Err(AgentError::GaveUp { attempts: failures, last: why });
                            }
                            tracing::warn!("cannot connect to the relay: {why}");
                            retry_at = Some(Instant::now() + jittered(backoff));
                            backoff = (backoff * 2).min(max_wait);
                        }
                    }
                }
                Event::Retry => {
                    retry_at = None;
                    connecting = Some(self.connect());
                }
                Event::Ws(m) => {
                    let recv_ms = now_ms();
                    if let Some(l) = self.link.as_mut() {
                        l.last_rx = Instant::now();
                    }
                    let lost = match m {
                        None => Some("the relay closed the link".to_owned()),
                        Some(Err(e)) => Some(e.to_string()),
                        Some(Ok(Message::Text(t))) => {
                            self.on_text(&t, recv_ms).await;
                            None
                        }
                        Some(Ok(Message::Close(f))) => {
                            Some(format!("relay closed: {}", f.map(|f| f.reason.to_string()).unwrap_or_default()))
                        }
                        Some(Ok(_)) => None,
                    };
                    if let Some(why) = lost {
                        self.link_down(why, None).await;
                        retry_at = Some(Instant::now() + jittered(start));
                    }
                }
                Event::WriterStopped(end) => {
                    let end = end.ok();
                    let why = end.as_ref().and_then(|e| e.error.clone()).unwrap_or_else(|| "writer stopped".into());
                    self.link_down(why, end).await;
                    retry_at = Some(Instant::now() + jittered(start));
                }
                Event::Dead => {
                    self.link_down(format!("nothing from the relay for {:.0} s", dead_after.as_secs_f64()), None).await;
                    retry_at = Some(Instant::now() + jittered(start));
                }
                Event::Internal(Internal::Send(text)) => self.send_text(text),
                Event::Internal(Internal::Final { correlation_id, text }) => {
                    if let Some(c) = &correlation_id {
                        self.dedupe.finish(c, &text);
                    }
                    self.send_text(text);
                }
                Event::Local(e) => self.on_local(e),
                Event::Supervisor(SupervisorEvent::State(s)) => self.send_text(Envelope::new(s).to_json()),
                Event::Supervisor(SupervisorEvent::Log(l)) => self.send_log(l),
                Event::Flush(permit) => {
                    if let Some(t) = self.pending.pop_front().or_else(|| self.pending_logs.pop_front()) {
                        permit.send(Out::Text(t));
                    }
                }
                Event::Simulator => {
                    let now = Instant::now();
                    self.boat.step(now.duration_since(self.last_step).as_secs_f64());
                    self.last_step = now;
                    let f = self.frame(None, "sensor_data", None, self.boat.data());
                    self.send_frame(f);
                }
                Event::SystemMetrics => {
                    let data = self.metrics.sample();
                    let f = self.frame(Some("system"), "system_metrics", None, data);
                    self.send_frame(f);
                }
                Event::Backfill => {
                    if let (Some(l), Some(f)) = (self.link.as_ref(), self.backlog.pop_front()) {
                        // A full writer, or one that just stopped (the link is going down): the
                        // frame goes back to the head of the backlog, never lost.
                        if let Err(
                            mpsc::error::TrySendError::Full(Out::Frame(f))
                            | mpsc::error::TrySendError::Closed(Out::Frame(f)),
                        ) = l.tx.try_send(Out::Frame(Box::new(f)))
                        {
                            self.backlog.push_front(*f);
                        }
                        if self.backlog.is_empty() {
                            tracing::info!("backfill complete");
                        }
                    }
                }
                Event::SafetyDue => {
                    if let Some(a) = self.safety.poll(Instant::now(), now_ms()) {
                        self.do_safety(a);
                    }
                }
                Event::AppDue => self.expire_app_commands(),
            }
        }
    }

    /// A new authenticated link: start its writer, tell the robot and the relay what they
    /// missed.
    fn link_up(&mut self, ws: Socket, dead_after: Duration) {
        let (sink, rx) = ws.split();
        let (tx, wrx) = mpsc::channel(WRITER_QUEUE);
        let (stop, stop_rx) = oneshot::channel();
        let writer = tokio::spawn(writer(sink, wrx, stop_rx, dead_after, dead_after / 3));
        self.link = Some(Link { rx, tx, stop: Some(stop), writer, last_rx: Instant::now() });
        self.safety.on_link_up();
        if !self.backlog.is_empty() {
            tracing::info!(
                frames = self.backlog.len(),
                rate = self.config.telemetry.backfill_rate,
                "sending telemetry buffered while offline (backfill, behind live frames)"
            );
        }
        // The relay forgets nothing it persists, but process state lives in its memory: resend it.
        if let Some(s) = &self.supervisor {
            let snapshot = s.snapshot();
            if !snapshot.processes.is_empty() {
                self.send_text(Envelope::new(snapshot).to_json());
            }
        }
    }

    /// The link is gone: recover what the writer had not sent, start counting the outage.
    async fn link_down(&mut self, why: String, end: Option<WriterEnd>) {
        tracing::warn!("relay link lost: {why}");
        let Some(mut l) = self.link.take() else { return };
        let end = match end {
            Some(e) => Some(e),
            None => {
                if let Some(stop) = l.stop.take() {
                    let _ = stop.send(false);
                }
                (&mut l.writer).await.ok()
            }
        };
        if let Some(mut end) = end {
            let mut unsent: Vec<Out> = end.in_flight.take().into_iter().collect();
            while let Ok(o) = end.rx.try_recv() {
                unsent.push(o);
            }
            // Keep their order, ahead of anything queued since.
            for o in unsent.into_iter().rev() {
                match o {
                    Out::Frame(f) => {
                        let mut f = *f;
                        f.backfill = true;
                        self.backlog.push_front(f);
                    }
                    Out::Text(t) => self.pending.push_front(t),
                }
            }
        }
        self.safety.on_link_down(Instant::now());
    }

    /// Opens and authenticates a link (owned data only, so the loop can go on meanwhile).
    fn connect(&self) -> Connecting {
        let url = self.url();
        let secret = self.config.client_secret.clone();
        let server = self.config.server_address.clone();
        let tls = self.tls();
        Box::pin(async move {
            let url = url.map_err(|e| SessionEnd::Lost(e.to_string()))?;
            let tls = tls.map_err(|e| SessionEnd::Lost(e.to_string()))?;
            let mut req = url.as_str().into_client_request().map_err(|e| SessionEnd::Lost(e.to_string()))?;
            let bearer = HeaderValue::from_str(&format!("Bearer {secret}")).map_err(|_| {
                SessionEnd::Refused(
                    ErrorCode::AuthFailed,
                    "clientSecret contains characters not allowed in a header".into(),
                )
            })?;
            req.headers_mut().insert("authorization", bearer);
            let mut ws =
                crate::net::websocket(req, &tls).await.map_err(|e| SessionEnd::Lost(format!("{server}: {e}")))?;
            // The relay answers auth_ok or error first.
            let first = tokio::time::timeout(Duration::from_secs(15), ws.next())
                .await
                .map_err(|_| SessionEnd::Lost("no answer to authentication".into()))?;
            match first {
                Some(Ok(Message::Text(t))) => match message::decode(&t) {
                    Ok(Envelope { body: Body::AuthOk(ok), .. }) => Ok((ws, ok)),
                    Ok(Envelope { body: Body::Error(e), .. })
                        if matches!(e.code, ErrorCode::AuthFailed | ErrorCode::Forbidden) =>
                    {
                        Err(SessionEnd::Refused(e.code, e.message))
                    }
                    Ok(other) => {
                        Err(SessionEnd::Lost(format!("unexpected first message {:?}", other.body.type_name())))
                    }
                    Err(e) => Err(SessionEnd::Lost(format!("unreadable first message: {e}"))),
                },
                other => Err(SessionEnd::Lost(format!("link closed during authentication: {other:?}"))),
            }
        })
    }

    /// A telemetry frame with the stream's next sequence number.
    fn frame(&mut self, stream: Option<&str>, subtype: &str, timestamp: Option<f64>, data: Value) -> Telemetry {
        let key = stream.unwrap_or(subtype);
        let seq = self.sequences.entry(key.to_owned()).or_insert(0);
        let sequence = *seq;
        *seq += 1;
        Telemetry {
            subtype: subtype.to_owned(),
            stream: stream.map(str::to_owned),
            sequence,
            timestamp: timestamp.unwrap_or_else(|| now_ms().floor()),
            system_time: None,
            epoch: Some(self.epoch.clone()),
            backfill: false,
            data,
            relay: None,
        }
    }

    /// Live frames go straight to the writer; without a link (or with a full one) they wait in
    /// the backlog, marked as backfill.
    fn send_frame(&mut self, frame: Telemetry) {
        let frame = match &self.link {
            Some(l) => match l.tx.try_send(Out::Frame(Box::new(frame))) {
                Ok(()) => return,
                Err(
                    mpsc::error::TrySendError::Full(Out::Frame(f)) | mpsc::error::TrySendError::Closed(Out::Frame(f)),
                ) => *f,
                Err(_) => return,
            },
            None => frame,
        };
        self.buffer(frame);
    }

    fn buffer(&mut self, mut frame: Telemetry) {
        frame.backfill = true;
        let b = &self.config.telemetry.buffer;
        if self.backlog.len() >= b.max_frames {
            self.backlog_dropped += 1;
            if self.backlog_dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.backlog_dropped,
                    max = b.max_frames,
                    policy = ?b.policy,
                    "offline telemetry buffer full; dropping frames"
                );
            }
            match b.policy {
                BufferPolicy::DropOldest => {
                    self.backlog.pop_front();
                }
                BufferPolicy::DropNewest => return,
            }
        }
        self.backlog.push_back(frame);
    }

    /// Replies and events: in order, after anything already waiting.
    fn send_text(&mut self, text: String) {
        if let (Some(l), true) = (&self.link, self.pending.is_empty()) {
            match l.tx.try_send(Out::Text(text)) {
                Ok(()) => {}
                Err(
                    mpsc::error::TrySendError::Full(Out::Text(t)) | mpsc::error::TrySendError::Closed(Out::Text(t)),
                ) => self.queue(t),
                Err(_) => {}
            }
        } else {
            self.queue(text);
        }
    }

    fn queue(&mut self, text: String) {
        if self.pending.len() >= PENDING_MAX {
            self.pending.pop_front();
            tracing::warn!("more than {PENDING_MAX} messages waiting for the relay; dropped the oldest");
        }
        self.pending.push_back(text);
    }

    /// Time-critical answers (clock sync, pong) skip the queue: their timestamps are taken now.
    fn send_urgent(&mut self, text: String) {
        // With a full or absent link the answer is dropped: a late clock-sync answer would only
        // mislead the relay.
        if let Some(l) = &self.link {
            let _ = l.tx.try_send(Out::Text(text));
        }
    }

    /// A supervised process's output line, within a rate budget; kept (bounded) while offline.
    fn send_log(&mut self, line: LogLine) {
        let now = Instant::now();
        if now.duration_since(self.log_budget.0) >= Duration::from_secs(1) {
            if self.logs_dropped > 0 {
                tracing::warn!(
                    dropped = self.logs_dropped,
                    "log lines over {LOG_LINES_PER_SECOND}/s were not forwarded"
                );
                self.logs_dropped = 0;
            }
            self.log_budget = (now, 0);
        }
        if self.log_budget.1 >= LOG_LINES_PER_SECOND {
            self.logs_dropped += 1;
            return;
        }
        self.log_budget.1 += 1;
        let text = Envelope::new(line).to_json();
        if let (Some(l), true) = (&self.link, self.pending_logs.is_empty() && self.pending.is_empty())
            && l.tx.try_send(Out::Text(text.clone())).is_ok()
        {
            return;
        }
        if self.pending_logs.len() >= PENDING_LOGS_MAX {
            self.pending_logs.pop_front();
        }
        self.pending_logs.push_back(text);
    }

    /// Handles a message from the relay.
    async fn on_text(&mut self, text: &str, recv_ms: f64) {
        let env = match message::decode_from_relay(text) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("unreadable message from the relay: {e}");
                return;
            }
        };
        let corr = env.correlation_id;
        let from = env.from;
        match env.body {
            Body::TimeSync(s) => {
                let r = TimeSyncResponse { t1: s.t1, t2: recv_ms, t3: now_ms() };
                self.send_urgent(Envelope::new(r).to_json());
            }
            Body::Ping(p) => {
                let mut e = Envelope::new(Pong { t: p.t, relay_time: Some(now_ms()) });
                e.correlation_id = corr;
                self.send_urgent(e.to_json());
            }
            Body::Error(e) => {
                tracing::warn!(code = %e.code, correlation = ?corr, "relay reported an error: {}", e.message)
            }
            Body::LeaseState(l) => {
                tracing::info!(holder = ?l.holder_name, reason = %l.reason, "control lease");
                if let Some(a) = self.safety.on_lease(&l, now_ms()) {
                    self.do_safety(a);
                }
            }
            Body::Pong(_) | Body::AuthOk(_) | Body::Presence(_) | Body::Ack(_) => {}
            Body::WebRtc(w) => self.on_webrtc(w, from),
            body => {
                let delivery = match body {
                    Body::AppCommand(_) => Delivery::of(text),
                    _ => Delivery::default(),
                };
                self.on_request(body, corr, from, delivery).await
            }
        }
    }

    /// Requests from operators. Each is answered exactly once per correlation ID: a
    /// redelivered request gets the stored answer instead of running again.
    async fn on_request(&mut self, body: Body, corr: Option<String>, from: Option<String>, delivery: Delivery) {
        let ty = body.type_name();
        if let Some(c) = &corr {
            match self.dedupe.begin(c) {
                Seen::New => {}
                Seen::Running => {
                    tracing::info!(correlation = %c, "{ty} redelivered while still running; its result will follow");
                    return;
                }
                Seen::Done(reply) => {
                    tracing::info!(correlation = %c, "{ty} redelivered after it finished; sending its result again");
                    self.send_text(reply);
                    return;
                }
            }
        }
        tracing::info!(correlation = ?corr, from = ?from, "{ty} request");
        match body {
            Body::ExecuteCommand(req) => match commands::check(&req, &self.config.commands) {
                Err(refusal) => {
                    let code = match refusal {
                        commands::Refusal::NotAllowed(_) => ErrorCode::CommandNotAllowed,
                        _ => ErrorCode::InvalidPayload,
                    };
                    tracing::warn!(command = %req.command, "refused: {refusal}");
                    self.finish(corr, from, failure(code, refusal.to_string()));
                }
                Ok(()) => {
                    let (tx, cfg) = (self.internal_tx(), self.config.commands.clone());
                    tokio::spawn(async move {
                        let (ptx, mut prx) = mpsc::channel(256);
                        let forward = {
                            let (tx, corr, from) = (tx.clone(), corr.clone(), from.clone());
                            tokio::spawn(async move {
                                while let Some(p) = prx.recv().await {
                                    let _ = tx.send(Internal::Send(addressed(p, corr.clone(), from.clone()))).await;
                                }
                            })
                        };
                        let out: CommandOutput = commands::run(&req, &cfg, ptx).await;
                        let _ = forward.await;
                        tracing::info!(command = %req.command, exit = ?out.exit_code, timed_out = out.timed_out, ms = out.duration_ms, "command finished");
                        let text = addressed(out, corr.clone(), from);
                        let _ = tx.send(Internal::Final { correlation_id: corr, text }).await;
                    });
                }
            },
            Body::AppCommand(a) => {
                if let Some(c) = &corr
                    && (self.waiting.contains_key(c) || self.held.iter().any(|h| h.local_id == *c))
                {
                    // Only if the dedupe memory forgot it while it waited: still one delivery.
                    tracing::info!(correlation = %c, "app_command redelivered while still waiting; its result will follow");
                    return;
                }
                if self.robots_connected() == 0 {
                    if let Some(why) = self.may_hold(delivery) {
                        let local_id = self.local_id(&corr);
                        let timeout = self.config.commands.app_command_timeout.value;
                        tracing::info!(
                            correlation = %local_id, command = %a.command,
                            "no robot software connected yet ({why}); holding the app command for up to {} s until one connects",
                            timeout.as_secs_f64()
                        );
                        let arrived = Instant::now();
                        self.held.push_back(Held {
                            local_id,
                            correlation_id: corr,
                            from,
                            command: a.command,
                            data: a.data,
                            arrived,
                            deadline: arrived + timeout,
                        });
                        return;
                    }
                    let msg = "no robot software is connected to the agent's local socket (telemetry.unixSocket)";
                    self.finish(corr, from, failure(ErrorCode::RobotUnavailable, msg.into()));
                    return;
                }
                // Anything still held goes first, so the robot sees commands in arrival order.
                self.release_held();
                let local_id = self.local_id(&corr);
                self.pass_to_robot(local_id, corr, from, a.command, a.data);
            }
            Body::UpdateClientConfig(u) => {
                let result = self.update_config(u.config).await;
                self.finish(corr, from, result);
            }
            Body::ReloadConfig(_) => {
                let result = self.reload_config().await;
                self.finish(corr, from, result);
            }
            Body::GetClientConfig(_) => {
                let result = match redacted_config(&self.config) {
                    Ok(config) => CommandResult {
                        ok: true,
                        error: None,
                        code: None,
                        data: Some(json!({"config": config, "protected": PROTECTED})),
                    },
                    Err(e) => failure(ErrorCode::Internal, format!("cannot represent the current config: {e}")),
                };
                self.finish(corr, from, result);
            }
            Body::ProcessCommand(pc) => {
                let Some(action) = ControlAction::parse(&pc.action) else {
                    let msg = format!("action must be \"start\", \"stop\" or \"restart\", got {:?}", pc.action);
                    self.finish(corr, from, failure(ErrorCode::InvalidPayload, msg));
                    return;
                };
                if pc.name.is_empty() {
                    let msg = "name is required: the process's key under paths in config.yaml".to_owned();
                    self.finish(corr, from, failure(ErrorCode::InvalidPayload, msg));
                    return;
                }
                let Some(sup) = self.supervisor.clone() else {
                    let msg = "process supervision is not running".to_owned();
                    self.finish(corr, from, failure(ErrorCode::Unsupported, msg));
                    return;
                };
                // Off the loop: stopping waits up to the grace period for the process to exit.
                let tx = self.internal_tx();
                tokio::spawn(async move {
                    let result = match sup.control(&pc.name, action).await {
                        Ok(done) => {
                            let mut data = json!({
                                "name": pc.name, "action": action.as_str(), "state": done.info.state,
                                "changed": done.changed,
                            });
                            if let Some(pid) = done.info.pid {
                                data["pid"] = json!(pid);
                            }
                            if let Some(how) = done.info.last_exit {
                                data["lastExit"] = json!(how);
                            }
                            CommandResult { ok: true, error: None, code: None, data: Some(data) }
                        }
                        Err(e @ ControlError::UnknownProcess { .. }) => {
                            failure(ErrorCode::UnknownProcess, e.to_string())
                        }
                        Err(e) => failure(ErrorCode::Internal, e.to_string()),
                    };
                    let text = addressed(result, corr.clone(), from);
                    let _ = tx.send(Internal::Final { correlation_id: corr, text }).await;
                });
            }
            Body::SpeedTest(s) => {
                let tx = self.internal_tx();
                let (server, id, secret) = (
                    self.config.server_address.clone(),
                    self.config.client_id.clone(),
                    self.config.client_secret.clone(),
                );
                let tls = self.tls();
                tokio::spawn(async move {
                    let bytes = s.bytes.unwrap_or(crate::speedtest::DEFAULT_BYTES);
                    let r = match tls {
                        Ok(tls) => crate::speedtest::run(&server, &id, &secret, &tls, bytes).await,
                        Err(e) => Err(e.to_string()),
                    };
                    let text = match r {
                        Ok(r) => {
                            tracing::info!(?r, "speed test done");
                            addressed(r, corr.clone(), from)
                        }
                        Err(e) => {
                            tracing::warn!("speed test failed: {e}");
                            addressed(failure(ErrorCode::CommandFailed, e), corr.clone(), from)
                        }
                    };
                    let _ = tx.send(Internal::Final { correlation_id: corr, text }).await;
                });
            }
            Body::DockerCommand(d) => {
                let tx = self.internal_tx();
                tokio::spawn(async move {
                    let result = match crate::docker::run(&d).await {
                        Ok(data) => CommandResult { ok: true, error: None, code: None, data: Some(data) },
                        Err((code, msg)) => failure(code, msg),
                    };
                    let text = addressed(result, corr.clone(), from);
                    let _ = tx.send(Internal::Final { correlation_id: corr, text }).await;
                });
            }
            other => {
                // Requests this agent cannot serve get an explicit refusal, not silence.
                let ty = other.type_name();
                tracing::warn!("unsupported request {ty:?} from {from:?}");
                let msg = format!("{ty} is not something this device accepts");
                self.finish(corr, from, failure(ErrorCode::Unsupported, msg));
            }
        }
    }

    /// Video signaling from a pilot: to the video task, or a `bye` when this build has none.
    fn on_webrtc(&mut self, w: message::WebRtc, from: Option<String>) {
        let Some(from) = from else { return };
        #[cfg(feature = "video")]
        if let Some(v) = &self.video {
            v.signal(crate::video::Signal { from, payload: w });
            return;
        }
        if w.subtype == "offer" {
            let bye = json!({"subtype": "bye", "sessionID": w.session_id, "reason": "video_unavailable",
                "message": "this agent was built without video"});
            if let Ok(b) = serde_json::from_value::<message::WebRtc>(bye) {
                self.send_text(addressed(b, None, Some(from)));
            }
        }
    }

    /// Whether an app command that finds no robot software connected may wait for it, and why.
    /// It may if it comes from the relay's offline queue (it was sent while the link was down,
    /// the robot may be starting with the agent), or if the robot software has not connected
    /// since the agent started and that was less than `commands.appCommandTimeout` ago, unless
    /// its sender refused late delivery (`"queue": false`, teleop). Never without a robot
    /// socket. A live command while the robot software has come and gone is refused at once.
    fn may_hold(&self, delivery: Delivery) -> Option<&'static str> {
        if self.local.iter().all(|l| l.unix_path().is_none()) {
            return None;
        }
        if delivery.offline_queued {
            return Some("queued while offline");
        }
        let starting = !self.robot_seen && self.started.elapsed() < self.config.commands.app_command_timeout.value;
        (starting && !delivery.refuses_lateness).then_some("the agent is starting")
    }

    /// The correlation ID the robot sees: the relay's, or a fresh `agent-<n>`.
    fn local_id(&mut self, corr: &Option<String>) -> String {
        corr.clone().unwrap_or_else(|| {
            self.local_ids += 1;
            format!("agent-{}", self.local_ids)
        })
    }

    /// Hands an app command to the robot software and waits `commands.appCommandTimeout` for
    /// its answer.
    fn pass_to_robot(
        &mut self,
        local_id: String,
        corr: Option<String>,
        from: Option<String>,
        command: String,
        data: Value,
    ) {
        self.broadcast(&json!({
            "type": "app_command", "correlationID": local_id, "command": command, "data": data, "from": from,
        }));
        let deadline = Instant::now() + self.config.commands.app_command_timeout.value;
        self.waiting.insert(local_id, Waiting { correlation_id: corr, from, deadline });
    }

    /// Passes the held app commands, oldest first, to the robot software, if any is connected
    /// (those whose time ran out are answered first).
    fn release_held(&mut self) {
        if self.held.is_empty() || self.robots_connected() == 0 {
            return;
        }
        self.expire_app_commands();
        for h in std::mem::take(&mut self.held) {
            tracing::info!(
                correlation = %h.local_id, command = %h.command, waited_ms = h.arrived.elapsed().as_millis() as u64,
                "passing a held app command to the robot software"
            );
            self.pass_to_robot(h.local_id, h.correlation_id, h.from, h.command, h.data);
        }
    }

    fn internal_tx(&self) -> mpsc::Sender<Internal> {
        match &self.internal {
            Some(tx) => tx.clone(),
            // Only before `run`; a closed channel makes the work's answer vanish, which cannot
            // happen once running.
            None => mpsc::channel(1).0,
        }
    }

    /// Sends the final answer to a request and remembers it for redeliveries.
    fn finish(&mut self, corr: Option<String>, from: Option<String>, result: CommandResult) {
        let text = addressed(result, corr.clone(), from);
        if let Some(c) = &corr {
            self.dedupe.finish(c, &text);
        }
        self.send_text(text);
    }

    /// What the robot software sent.
    fn on_local(&mut self, event: LocalEvent) {
        match event {
            LocalEvent::Telemetry { stream, subtype, timestamp, data } => {
                let f = self.frame(Some(&stream), &subtype, timestamp, data);
                self.send_frame(f);
            }
            LocalEvent::CommandResult { correlation_id, ok, error, data } => {
                let Some(w) = self.waiting.remove(&correlation_id) else {
                    tracing::warn!(correlation = %correlation_id, "robot answered an app command nobody is waiting for");
                    return;
                };
                let result = if ok {
                    CommandResult { ok, error: None, code: None, data }
                } else {
                    let why = error.unwrap_or_else(|| "the robot software refused the command".into());
                    CommandResult { ok, error: Some(why), code: Some(ErrorCode::CommandFailed), data }
                };
                self.finish(w.correlation_id, w.from, result);
            }
            LocalEvent::RobotConnected { name } => {
                tracing::info!(name = ?name, "robot software connected to the local socket");
                self.robot_seen = true;
                // A robot that (re)connects during a stop must hear about it, before any command.
                if let Some(s) = self.safety.active().cloned() {
                    self.broadcast(&safety_json(&s));
                }
                self.release_held();
            }
            LocalEvent::RobotDisconnected => tracing::warn!("robot software disconnected from the local socket"),
        }
    }

    fn expire_app_commands(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> =
            self.waiting.iter().filter(|(_, w)| w.deadline <= now).map(|(k, _)| k.clone()).collect();
        for id in expired {
            if let Some(w) = self.waiting.remove(&id) {
                let secs = self.config.commands.app_command_timeout.value.as_secs_f64();
                let msg = format!("the robot software did not answer app command {id} within {secs:.0} s");
                tracing::warn!("{msg}");
                self.finish(w.correlation_id, w.from, failure(ErrorCode::RobotUnavailable, msg));
            }
        }
        while let Some(i) = self.held.iter().position(|h| h.deadline <= now) {
            let Some(h) = self.held.remove(i) else { break };
            let msg = format!(
                "app command {} waited {} s for robot software on the agent's local socket (telemetry.unixSocket {}); none connected",
                h.local_id,
                (h.deadline - h.arrived).as_secs_f64(),
                self.local.iter().find_map(|l| l.unix_path()).map(|p| p.display().to_string()).unwrap_or_default(),
            );
            tracing::warn!("{msg}");
            self.finish(h.correlation_id, h.from, failure(ErrorCode::RobotUnavailable, msg));
        }
    }

    fn do_safety(&mut self, action: safety::Action) {
        match action {
            safety::Action::Stop(s) => {
                let robots = self.broadcast(&safety_json(&s));
                tracing::warn!(
                    policy = %s.policy, reason = %s.reason, controller = ?s.controller, robots,
                    "SAFETY STOP sent to the robot software"
                );
                self.send_text(Envelope::new(s).to_json());
            }
            safety::Action::Clear { reason } => {
                tracing::info!(%reason, "safety stop cleared");
                self.broadcast(&json!({"type": "safety_clear", "reason": reason}));
            }
        }
    }

    /// `update_client_config`: merge the patch over the running config (a JSON merge patch:
    /// objects merge, `null` removes a key), validate, save, apply.
    async fn update_config(&mut self, patch: Value) -> CommandResult {
        let Some(obj) = patch.as_object() else {
            return failure(ErrorCode::InvalidPayload, "config must be an object of config.yaml keys".into());
        };
        if let Some(k) = PROTECTED.iter().find(|k| obj.contains_key(**k)) {
            return failure(
                ErrorCode::InvalidConfig,
                format!(
                    "{k} cannot be changed remotely (a mistake would cut the device off); edit config.yaml on the device"
                ),
            );
        }
        if writes_redacted(&patch) {
            return failure(
                ErrorCode::InvalidConfig,
                format!(
                    "the patch contains {REDACTED:?}, which stands for a secret get_client_config did not send; send the real value or leave the key out"
                ),
            );
        }
        let mut merged = match serde_json::to_value(&self.config) {
            Ok(v) => v,
            Err(e) => return failure(ErrorCode::Internal, format!("cannot represent the current config: {e}")),
        };
        merge_patch(&mut merged, &patch);
        let new: Config = match serde_json::from_value(merged) {
            Ok(c) => c,
            Err(e) => return failure(ErrorCode::InvalidConfig, format!("the updated config is invalid: {e}")),
        };
        if let Err(e) = new.validate("update_client_config") {
            return failure(ErrorCode::InvalidConfig, format!("the updated config is invalid: {e}"));
        }
        if let Some(p) = &self.config_path {
            if let Err(e) = new.save(p) {
                return failure(ErrorCode::Internal, format!("cannot save the config: {e}"));
            }
            new.save_last_good(p);
        }
        self.apply(new).await
    }

    /// `reload_config`: read config.yaml again; a file that does not validate is refused and
    /// the running config stays.
    async fn reload_config(&mut self) -> CommandResult {
        let Some(path) = self.config_path.clone() else {
            return failure(ErrorCode::Unsupported, "this agent was started without a config file".into());
        };
        let loaded = Config::load(&path).and_then(|mut c| {
            c.apply_env(|k| std::env::var(k).ok(), &path.display().to_string())?;
            Ok(c)
        });
        match loaded {
            Ok(c) => {
                c.save_last_good(&path);
                self.apply(c).await
            }
            Err(e) => {
                tracing::error!("reload refused, keeping the running config: {e}");
                failure(ErrorCode::InvalidConfig, format!("{e}; the running config is unchanged"))
            }
        }
    }

    /// Switches to a validated config: restarts only the processes whose definition changed,
    /// applies what can change live, lists what needs an agent restart.
    async fn apply(&mut self, new: Config) -> CommandResult {
        let old = &self.config;
        let mut restart_required = Vec::new();
        // serverAddress and the credentials take effect at the next reconnect (only a reload can
        // change them); these need the agent restarted:
        for (key, changed) in [
            ("caFile", old.ca_file != new.ca_file),
            ("logLevel", old.log_level != new.log_level),
            ("telemetry.udp", old.telemetry.udp != new.telemetry.udp),
            ("telemetry.unixSocket", old.telemetry.unix_socket != new.telemetry.unix_socket),
            ("reconnectInterval", old.reconnect_interval != new.reconnect_interval),
            ("video", old.video != new.video),
        ] {
            if changed {
                restart_required.push(key);
            }
        }
        let report = match &self.supervisor {
            Some(s) => Some(s.apply(new.paths.clone(), new.command_restart_max_delay.value).await),
            None => None,
        };
        self.dedupe.set_capacity(new.commands.remember);
        self.safety.set_config(new.safety.clone());
        self.retune = true;
        // The running config is the file's (so a later update never writes old values back);
        // the inputs listed in restartRequired keep running as they were until the restart.
        self.config = new;
        let data = match report {
            Some(r) => json!({
                "started": r.started, "restarted": r.restarted, "stopped": r.stopped, "unchanged": r.unchanged,
                "restartRequired": restart_required,
            }),
            None => json!({"restartRequired": restart_required}),
        };
        tracing::info!(%data, "configuration applied");
        CommandResult { ok: true, error: None, code: None, data: Some(data) }
    }

    /// Joins the fleet with the handshake key: `register`, then poll the request's status with
    /// backoff until an admin decides. On approval the credentials are written to config.yaml
    /// (atomically, keeping every other key) before the agent connects with them.
    async fn onboard(&mut self) -> Result<(), AgentError> {
        if self.config.registration_request_id.is_none() {
            let id = self.register().await?;
            tracing::info!(request = %id, "registration sent; waiting for an admin to approve it");
            self.config.registration_request_id = Some(id);
            self.save()?;
        }
        let request = self.config.registration_request_id.clone().unwrap_or_default();
        let mut status_url = url::Url::parse(&self.config.server_address)
            .map_err(|e| AgentError::Config(format!("serverAddress: {e}")))?;
        let scheme = if status_url.scheme() == "wss" { "https" } else { "http" };
        status_url
            .set_scheme(scheme)
            .map_err(|_| AgentError::Config("serverAddress: cannot derive the status URL".into()))?;
        let path = format!("{}/status/{request}", status_url.path().trim_end_matches('/'));
        status_url.set_path(&path);
        status_url.set_query(None);
        let tls = self.tls()?;
        let mut wait = Duration::from_secs(1);
        loop {
            match crate::net::get_json(&status_url, &tls).await {
                Ok((404, _)) => {
                    // The relay forgot the request (e.g. a new database): register again.
                    tracing::warn!(%request, "the relay does not know this registration request; registering again");
                    self.config.registration_request_id = None;
                    self.save()?;
                    return Box::pin(self.onboard()).await;
                }
                Ok((_, v)) => match v["status"].as_str() {
                    Some("approved") => {
                        let (Some(id), Some(secret)) = (v["clientID"].as_str(), v["clientSecret"].as_str()) else {
                            return Err(AgentError::Config(format!(
                                "request {request} was approved but its secret was already fetched; ask an admin to rotate this device's secret and put it in config.yaml"
                            )));
                        };
                        self.config.client_id = id.to_owned();
                        self.config.client_secret = secret.to_owned();
                        self.config.registration_request_id = None;
                        self.save()?;
                        tracing::info!(client_id = %id, "approved; credentials saved to config.yaml");
                        return Ok(());
                    }
                    Some("rejected") => return Err(AgentError::Rejected(request)),
                    _ => tracing::debug!(%request, "registration still pending"),
                },
                Err(e) => tracing::warn!("cannot poll the registration status: {e}"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// The TLS settings for `wss://` (built once; a bad `caFile` is a configuration error).
    fn tls(&self) -> Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>, AgentError> {
        if let Some(t) = self.tls.get() {
            return Ok(t.clone());
        }
        let t = crate::net::tls_config(self.config.ca_file.as_deref()).map_err(AgentError::Config)?;
        Ok(self.tls.get_or_init(|| t).clone())
    }

    fn save(&self) -> Result<(), AgentError> {
        match &self.config_path {
            Some(p) => {
                self.config.save(p).map_err(|e| AgentError::Config(format!("cannot save the config: {e}")))?;
                self.config.save_last_good(p);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Sends `register` on the device endpoint and returns the requestID.
    async fn register(&self) -> Result<String, AgentError> {
        let mut wait = Duration::from_secs(1);
        loop {
            let tls = self.tls()?;
            let attempt = async {
                let req = self.config.server_address.as_str().into_client_request().map_err(|e| e.to_string())?;
                let mut ws = crate::net::websocket(req, &tls).await?;
                let reg = signaling::message::Register {
                    name: self.config.name.clone(),
                    handshake_key: self.config.handshake_key.clone(),
                };
                ws.send(Message::Text(Envelope::new(reg).to_json().into())).await.map_err(|e| e.to_string())?;
                while let Some(m) = tokio::time::timeout(Duration::from_secs(15), ws.next())
                    .await
                    .map_err(|_| "no answer".to_owned())?
                {
                    if let Ok(Message::Text(t)) = m {
                        return message::decode(&t).map_err(|e| e.to_string());
                    }
                }
                Err("the relay closed the connection without answering".to_owned())
            };
            match attempt.await {
                Ok(Envelope { body: Body::RegistrationPending(p), .. }) => return Ok(p.request_id),
                Ok(Envelope { body: Body::Error(e), .. }) if e.code == ErrorCode::InvalidHandshakeKey => {
                    return Err(AgentError::Refused { code: e.code, message: e.message });
                }
                Ok(Envelope { body: Body::Error(e), .. }) if e.code == ErrorCode::RateLimited => {
                    wait = Duration::from_millis(e.retry_after_ms.unwrap_or(5_000)).max(wait);
                    tracing::warn!("registration rate limited: {}", e.message);
                }
                Ok(other) => tracing::warn!("unexpected answer to register: {:?}", other.body.type_name()),
                Err(e) => tracing::warn!("registration failed: {e}"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

/// Keys `update_client_config` may not change: a typo in them would cut the device off.
const PROTECTED: &[&str] =
    &["serverAddress", "clientID", "clientSecret", "handshakeKey", "registrationRequestID", "caFile"];

/// What `get_client_config` sends in place of a secret that is set.
const REDACTED: &str = "<redacted>";

/// The running config as `get_client_config` shows it: the same JSON view that
/// `update_client_config` patches (config.yaml's key names), with the secrets replaced by
/// [`REDACTED`]: `clientSecret`, `handshakeKey` and the TURN servers' `credential`s.
fn redacted_config(config: &Config) -> Result<Value, serde_json::Error> {
    fn hide(secret: Option<&mut Value>) {
        if let Some(s) = secret.filter(|s| s.as_str().is_some_and(|s| !s.is_empty())) {
            *s = json!(REDACTED);
        }
    }
    let mut v = serde_json::to_value(config)?;
    hide(v.get_mut("clientSecret"));
    hide(v.get_mut("handshakeKey"));
    if let Some(servers) = v.pointer_mut("/video/iceServers").and_then(Value::as_array_mut) {
        for server in servers {
            hide(server.get_mut("credential"));
        }
    }
    Ok(v)
}

/// Whether a patch writes the redaction placeholder back as a value (a client that edited
/// what `get_client_config` sent and returned a secret it never saw).
fn writes_redacted(patch: &Value) -> bool {
    match patch {
        Value::String(s) => s == REDACTED,
        Value::Array(a) => a.iter().any(writes_redacted),
        Value::Object(o) => o.values().any(writes_redacted),
        _ => false,
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// A message for an operator, answering `corr` (addressed to `to` so it finds them even if
/// the relay restarted since the request).
fn addressed(body: impl Into<Body>, corr: Option<String>, to: Option<String>) -> String {
    let mut e = Envelope::new(body);
    e.correlation_id = corr;
    e.client_id = to;
    e.to_json()
}

fn failure(code: ErrorCode, message: String) -> CommandResult {
    CommandResult { ok: false, error: Some(message), code: Some(code), data: None }
}

/// The local-socket form of a safety stop.
fn safety_json(s: &SafetyStop) -> Value {
    json!({
        "type": "safety_stop", "policy": s.policy, "reason": s.reason, "timestamp": s.timestamp,
        "controller": s.controller,
    })
}

fn jittered(d: Duration) -> Duration {
    let wait = d.mul_f64(rand::rng().random_range(0.5..1.0));
    tracing::info!("reconnecting in {:.1} s", wait.as_secs_f64());
    wait
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period.max(Duration::from_millis(1)));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    t
}

async fn opt<F: std::future::Future + Unpin>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn next_opt(
    s: Option<&mut SplitStream<Socket>>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(t: Option<&mut tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn reserve_opt(tx: Option<mpsc::Sender<Out>>) -> Option<mpsc::OwnedPermit<Out>> {
    match tx {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

type Connecting = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Socket, AuthOk), SessionEnd>> + Send>>;

/// Writes to the relay: queued messages, and a ping every `ping_every` so a dead link shows
/// (the relay's pongs count as traffic). A write that cannot complete within `limit` means the
/// link is gone. Hands back whatever it did not send.
async fn writer(
    mut sink: SplitSink<Socket, Message>,
    mut rx: mpsc::Receiver<Out>,
    mut stop: oneshot::Receiver<bool>,
    limit: Duration,
    ping_every: Duration,
) -> WriterEnd {
    let mut ping = ticker(ping_every);
    ping.reset();
    loop {
        let out = tokio::select! {
            graceful = &mut stop => {
                if graceful.unwrap_or(false) {
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
                }
                return WriterEnd { rx, in_flight: None, error: None };
            }
            _ = ping.tick() => None,
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => return WriterEnd { rx, in_flight: None, error: None },
            },
        };
        let msg = match &out {
            None => Message::Ping(Default::default()),
            Some(Out::Text(t)) => Message::Text(t.clone().into()),
            Some(Out::Frame(f)) => {
                let mut f = (**f).clone();
                f.system_time = Some(now_ms().floor());
                Message::Text(Envelope::new(f).to_json().into())
            }
        };
        let sent = tokio::select! {
            _ = &mut stop => return WriterEnd { rx, in_flight: out, error: None },
            r = tokio::time::timeout(limit, sink.send(msg)) => r,
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return WriterEnd { rx, in_flight: out, error: Some(e.to_string()) },
            Err(_) => {
                let error = Some(format!("could not send for {:.0} s", limit.as_secs_f64()));
                return WriterEnd { rx, in_flight: out, error };
            }
        }
    }
}

#[derive(Debug)]
enum SessionEnd {
    Refused(ErrorCode, String),
    Lost(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_view_hides_secrets_that_are_set() {
        let mut c = Config::parse(
            "serverAddress: ws://r/ws\nclientID: boat-1\nclientSecret: s3cret\nteamNotes: kept\n\
             video:\n  iceServers:\n    - urls: [\"turn:t:3478\"]\n      username: u\n      credential: pw\n",
            "test",
        )
        .unwrap();
        let v = redacted_config(&c).unwrap();
        assert_eq!(v["clientSecret"], REDACTED);
        assert_eq!(v["handshakeKey"], "", "an unset secret stays empty");
        assert_eq!(v["video"]["iceServers"][0]["credential"], REDACTED);
        assert_eq!(v["video"]["iceServers"][0]["username"], "u");
        assert_eq!((v["clientID"].as_str(), v["teamNotes"].as_str()), (Some("boat-1"), Some("kept")));
        assert!(!v.to_string().contains("s3cret") && !v.to_string().contains("\"pw\""));
        c.handshake_key = "group-key".into();
        assert_eq!(redacted_config(&c).unwrap()["handshakeKey"], REDACTED);
        assert!(writes_redacted(&json!({"video": {"iceServers": [{"urls": [], "credential": REDACTED}]}})));
        assert!(!writes_redacted(&json!({"logLevel": "debug"})));
    }

    #[test]
    fn the_offline_queue_mark_and_queue_false_are_read_from_the_envelope() {
        let queued = r#"{"_offline_queued":true,"type":"app_command","correlationID":"q1","clientID":"boat-1","from":"op-1","payload":{"command":"set_waypoints","data":{"waypoints":[]}}}"#;
        assert_eq!(Delivery::of(queued), Delivery { offline_queued: true, refuses_lateness: false });
        let teleop = r#"{"type":"app_command","from":"op-1","payload":{"command":"teleop","data":{"queue":true},"queue":false}}"#;
        assert_eq!(Delivery::of(teleop), Delivery { offline_queued: false, refuses_lateness: true });
        let odd = r#"{"_offline_queued":"yes","type":"app_command","payload":{"command":"x","queue":0}}"#;
        assert_eq!(Delivery::of(odd), Delivery::default(), "only true and false count");
        assert_eq!(Delivery::of("not json"), Delivery::default());
    }

    #[test]
    fn merge_patch_merges_objects_and_null_deletes() {
        let mut v = json!({"a": 1, "paths": {"x": {"runOnInit": "a"}, "y": {"runOnInit": "b"}}});
        merge_patch(&mut v, &json!({"a": 2, "paths": {"x": {"runOnInit": "c"}, "y": null}}));
        assert_eq!(v, json!({"a": 2, "paths": {"x": {"runOnInit": "c"}}}));
    }
}
