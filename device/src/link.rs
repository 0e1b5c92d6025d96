//! The relay link: connect, authenticate, answer clock sync, publish telemetry, reconnect.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use signaling::message::{self, Body, CommandResult, Pong, Telemetry, TimeSyncResponse};
use signaling::{Envelope, ErrorCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util_shim::Cancel;

use crate::config::Config;
use crate::sim::Boat;

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

/// The agent's publishing state, kept across reconnects.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    /// Changes every process start, so the relay tells a restart from duplicates.
    epoch: String,
    sequence: u64,
    boat: Boat,
    last_step: Instant,
    /// Where config.yaml lives, to store the credentials received at onboarding.
    config_path: Option<std::path::PathBuf>,
    /// Whether the current session got past authentication (resets the reconnect backoff).
    authenticated: bool,
    /// TLS client settings, built on first use.
    tls: std::sync::OnceLock<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// Longest wait between reconnect attempts (unless `reconnectInterval` is longer).
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Agent {
    /// An agent for `config`.
    pub fn new(config: Config) -> Self {
        let epoch = format!("{:08x}", rand::rng().random::<u32>());
        Agent {
            config,
            epoch,
            sequence: 0,
            boat: Boat::default(),
            last_step: Instant::now(),
            config_path: None,
            authenticated: false,
            tls: Default::default(),
        }
    }

    /// Saves credentials received at onboarding to this file.
    pub fn with_config_path(mut self, path: impl Into<std::path::PathBuf>) -> Self {
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

    /// Runs until `cancel` fires or the relay refuses the credentials. Reconnects with
    /// exponential backoff (with jitter) after every other failure.
    pub async fn run(&mut self, mut cancel: Cancel) -> Result<(), AgentError> {
        if self.config.client_id.is_empty() {
            tokio::select! {
                r = self.onboard() => r?,
                _ = cancel.cancelled() => return Ok(()),
            }
        }
        let start = Duration::from_secs_f64(self.config.reconnect_interval);
        let max_wait = BACKOFF_MAX.max(start);
        let mut backoff = start;
        // Consecutive attempts that did not reach `auth_ok`.
        let mut failures = 0u32;
        loop {
            self.authenticated = false;
            let result = tokio::select! {
                r = self.session() => r,
                _ = cancel.cancelled() => return Ok(()),
            };
            let why = match result {
                Err(SessionEnd::Refused(code, message)) => return Err(AgentError::Refused { code, message }),
                Err(SessionEnd::Lost(why)) => why,
                Ok(()) => "the relay closed the link".to_owned(),
            };
            tracing::warn!("relay link lost: {why}");
            if self.authenticated {
                // The link worked: start the backoff over.
                failures = 0;
                backoff = start;
            } else {
                failures += 1;
                let max = self.config.max_reconnect_attempts;
                if max > 0 && failures >= max {
                    return Err(AgentError::GaveUp { attempts: failures, last: why });
                }
            }
            let jitter = rand::rng().random_range(0.5..1.0);
            let wait = backoff.mul_f64(jitter);
            tracing::info!("reconnecting in {:.1} s", wait.as_secs_f64());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Ok(()),
            }
            backoff = (backoff * 2).min(max_wait);
        }
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
            Some(p) => self.config.save(p).map_err(|e| AgentError::Config(format!("cannot save the config: {e}"))),
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
                        return Ok(message::decode(&t).map_err(|e| e.to_string())?);
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

    async fn session(&mut self) -> Result<(), SessionEnd> {
        let url = self.url().map_err(|e| SessionEnd::Lost(e.to_string()))?;
        let mut req = url.as_str().into_client_request().map_err(|e| SessionEnd::Lost(e.to_string()))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.config.client_secret)).map_err(|_| {
            SessionEnd::Refused(
                ErrorCode::AuthFailed,
                "clientSecret contains characters not allowed in a header".into(),
            )
        })?;
        req.headers_mut().insert("authorization", bearer);
        let tls = self.tls().map_err(|e| SessionEnd::Lost(e.to_string()))?;
        let ws = crate::net::websocket(req, &tls)
            .await
            .map_err(|e| SessionEnd::Lost(format!("{}: {e}", self.config.server_address)))?;
        let (mut tx, mut rx) = ws.split();

        // The relay answers auth_ok or error first.
        let first = tokio::time::timeout(Duration::from_secs(15), rx.next())
            .await
            .map_err(|_| SessionEnd::Lost("no answer to authentication".into()))?;
        let ping_interval = match first {
            Some(Ok(Message::Text(t))) => match message::decode(&t) {
                Ok(Envelope { body: Body::AuthOk(ok), .. }) => {
                    tracing::info!(client_id = %ok.client_id, org = %ok.org, "authenticated with the relay");
                    Duration::from_millis(ok.ping_interval_ms.max(100))
                }
                Ok(Envelope { body: Body::Error(e), .. })
                    if matches!(e.code, ErrorCode::AuthFailed | ErrorCode::Forbidden) =>
                {
                    return Err(SessionEnd::Refused(e.code, e.message));
                }
                Ok(other) => {
                    return Err(SessionEnd::Lost(format!("unexpected first message {:?}", other.body.type_name())));
                }
                Err(e) => return Err(SessionEnd::Lost(format!("unreadable first message: {e}"))),
            },
            other => {
                return Err(SessionEnd::Lost(format!("link closed during authentication: {other:?}")));
            }
        };
        self.authenticated = true;
        tracing::debug!(relay_ping_ms = ping_interval.as_millis() as u64, "link up");
        // Dead link detection: the agent pings every third of connectionTimeout, so a relay
        // that answers nothing (not even pongs) for connectionTimeout is gone, whatever TCP says.
        let dead_after = Duration::from_secs_f64(self.config.connection_timeout);
        let mut heartbeat = tokio::time::interval(dead_after / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A send that cannot complete within the timeout means the same.
        let send_limit = dead_after;
        let period = Duration::from_secs_f64(1.0 / self.config.telemetry.rate_hz);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_rx = Instant::now();
        self.last_step = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick(), if self.config.telemetry.simulator => {
                    let frame = self.next_frame();
                    send_within(&mut tx, Message::Text(frame.into()), send_limit).await?;
                }
                _ = heartbeat.tick() => {
                    send_within(&mut tx, Message::Ping(Default::default()), send_limit).await?;
                }
                msg = rx.next() => {
                    let recv_ms = now_ms();
                    last_rx = Instant::now();
                    match msg {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(SessionEnd::Lost(e.to_string())),
                        Some(Ok(Message::Text(t))) => {
                            if let Some(reply) = self.on_message(&t, recv_ms) {
                                send_within(&mut tx, Message::Text(reply.into()), send_limit).await?;
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            return Err(SessionEnd::Lost(format!("relay closed: {}", f.map(|f| f.reason.to_string()).unwrap_or_default())));
                        }
                        Some(Ok(_)) => {}
                    }
                }
                _ = tokio::time::sleep_until((last_rx + dead_after).into()) => {
                    return Err(SessionEnd::Lost(format!("nothing from the relay for {:.0} s", dead_after.as_secs_f64())));
                }
            }
        }
    }

    fn next_frame(&mut self) -> String {
        let now = Instant::now();
        self.boat.step(now.duration_since(self.last_step).as_secs_f64());
        self.last_step = now;
        let t = now_ms().floor();
        let frame = Telemetry {
            subtype: "sensor_data".into(),
            stream: None,
            sequence: self.sequence,
            timestamp: t,
            system_time: Some(t),
            epoch: Some(self.epoch.clone()),
            backfill: false,
            data: self.boat.data(),
            relay: None,
        };
        self.sequence += 1;
        Envelope::new(frame).to_json()
    }

    /// Handles a message from the relay; returns the reply to send, if any.
    fn on_message(&mut self, text: &str, recv_ms: f64) -> Option<String> {
        let env = match message::decode(text) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("unreadable message from the relay: {e}");
                return None;
            }
        };
        let corr = env.correlation_id.clone();
        match env.body {
            Body::TimeSync(s) => {
                let r = TimeSyncResponse { t1: s.t1, t2: recv_ms, t3: now_ms() };
                Some(Envelope::new(r).to_json())
            }
            Body::Ping(p) => {
                let mut e = Envelope::new(Pong { t: p.t, relay_time: Some(now_ms()) });
                e.correlation_id = corr;
                Some(e.to_json())
            }
            Body::Error(e) => {
                tracing::warn!(code = %e.code, "relay reported an error: {}", e.message);
                None
            }
            // Relay events this agent version does not act on yet.
            Body::Pong(_) | Body::AuthOk(_) | Body::LeaseState(_) | Body::Presence(_) | Body::Ack(_) => None,
            other => {
                // Requests this agent version cannot serve get an explicit refusal, not silence.
                let ty = other.type_name();
                tracing::warn!("unsupported request {ty:?} from {:?}", env.from);
                let reply = CommandResult {
                    ok: false,
                    error: Some(format!("{ty} is not supported by this agent version")),
                    code: Some(ErrorCode::Unsupported),
                    data: None,
                };
                let mut e = Envelope::new(reply);
                e.correlation_id = corr;
                e.client_id = env.from;
                Some(e.to_json())
            }
        }
    }
}

/// Sends one message, giving up (link lost) if it cannot be written within `limit`.
async fn send_within<S>(tx: &mut S, m: Message, limit: Duration) -> Result<(), SessionEnd>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    match tokio::time::timeout(limit, tx.send(m)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionEnd::Lost(e.to_string())),
        Err(_) => Err(SessionEnd::Lost(format!("could not send for {:.0} s", limit.as_secs_f64()))),
    }
}

enum SessionEnd {
    Refused(ErrorCode, String),
    Lost(String),
}
