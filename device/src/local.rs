//! The agent's local API: how the robot's own software, on the same machine, hands the agent
//! telemetry and command results, and hears app commands and safety events. The robot never
//! talks to the relay; it talks to this.
//!
//! Two inputs, either may be off:
//!
//! - **UDP** (telemetry only): one JSON object per datagram on a loopback port. Fire and forget
//!   for the robot; a refused datagram is answered with an `error` datagram to its sender.
//! - **Unix socket** (both ways): one JSON object per line. In: `telemetry`, `command_result`,
//!   `hello`. Out: whatever the agent [`LocalApi::broadcast`]s (`app_command`, `safety_stop`,
//!   `safety_clear`, ...), plus `welcome` and `error` answers to the client's own lines.
//!
//! ```text
//! robot -> {"type":"hello","name":"boat-sim"}
//! agent -> {"type":"welcome","agent":"tether-device 0.1.0"}
//! robot -> {"type":"telemetry","stream":"nav","data":{"gps":{"latitude":37.8}}}
//! agent -> {"type":"app_command","correlationID":"c-1","command":"set_waypoint","data":{..},"from":"pilot-1"}
//! robot -> {"type":"command_result","correlationID":"c-1","ok":true,"data":{..}}
//! robot -> {"type":"telemetry"}
//! agent -> {"type":"error","code":"invalid_payload","message":"telemetry needs a \"stream\" ..."}
//! ```
//!
//! How to drive it: [`LocalApi::bind`] with a [`LocalConfig`] and the sending half of a bounded
//! channel, then read [`LocalEvent`]s from the other half; call [`LocalApi::broadcast`] to
//! reach the robot and [`LocalApi::shutdown`] to stop. Telemetry is handed over with
//! `send().await`: when the agent reads slowly the inputs slow down (UDP datagrams then wait in,
//! and eventually overflow, the kernel's buffer) instead of events being dropped here.
//!
//! Refusals never close a connection, except a line over [`MAX_LINE`] bytes (the stream cannot
//! be resynchronised cheaply, so the client gets `frame_too_large` and is closed). A client
//! that stops reading is disconnected once [`CLIENT_QUEUE`] lines wait for it; the line being
//! written at that moment may reach it cut short, so a robot should ignore a last line without
//! its newline. Message parsing is sans-IO ([`decode`]) and tested without sockets.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use signaling::ErrorCode;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// The longest line accepted on the Unix socket, newline excluded (1 MiB, like the relay's
/// message limit). A longer line gets `frame_too_large` and the connection is closed.
pub const MAX_LINE: usize = 1 << 20;

/// How many outgoing lines may wait for one Unix client. A client that lets more pile up is not
/// reading; it is disconnected (its queued lines are dropped) so it cannot hold up the agent.
pub const CLIENT_QUEUE: usize = 256;

/// A Unix client that says nothing for this long is announced as
/// [`LocalEvent::RobotConnected`] without a name. Waiting a moment lets `hello` supply the name,
/// and keeps probes (another agent checking whether the socket is live) out of the events.
const HELLO_GRACE: Duration = Duration::from_secs(1);

/// How long a closing connection may take to flush its last lines (e.g. the `frame_too_large`
/// error) before it is dropped anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the stale-socket probe waits for a connection to an existing socket file. A
/// listener too busy to accept in this time is alive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Mode of the socket file: the agent's user and group may connect, nobody else.
const SOCKET_MODE: u32 = 0o660;

/// Larger than any UDP payload (65 507 bytes over IPv4), so a datagram is never truncated.
const MAX_DATAGRAM: usize = 1 << 16;

/// `subtype` when the robot leaves it out (what the relay assumes too).
const DEFAULT_SUBTYPE: &str = "sensor_data";

/// Where the local API listens. `None` disables an input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalConfig {
    /// UDP address for telemetry datagrams. Should be loopback (`127.0.0.1:<port>`); any other
    /// address lets the network inject telemetry and is bound with a warning. Port 0 picks a
    /// free port ([`LocalApi::udp_addr`] tells which).
    pub udp: Option<SocketAddr>,
    /// Path of the Unix socket for JSON lines both ways. A stale socket file is replaced, a live
    /// one (another agent) is an error; a missing parent directory is created. Mode 0660.
    pub unix: Option<PathBuf>,
}

/// What the robot's software told the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalEvent {
    /// A telemetry frame, from UDP or the Unix socket.
    Telemetry {
        /// The robot's stream name (1-64 characters of `A-Z a-z 0-9 _ . -`).
        stream: String,
        /// The frame's subtype (`sensor_data` when the robot left it out).
        subtype: String,
        /// Device clock in ms since the Unix epoch as the robot stamped it; `None` when it did
        /// not, and the agent stamps the time it takes the frame.
        timestamp: Option<f64>,
        /// The robot's data object, untouched.
        data: Value,
    },
    /// The robot's answer to an `app_command` (Unix socket only).
    CommandResult {
        /// The `correlationID` of the `app_command`.
        correlation_id: String,
        /// Whether the robot carried it out.
        ok: bool,
        /// Why not, when `ok` is false (if the robot said).
        error: Option<String>,
        /// The robot's result, if any.
        data: Option<Value>,
    },
    /// A Unix client arrived: sent once per connection, when it says `hello` (with its name) or
    /// sends anything else, or after a second of silence (without a name).
    RobotConnected {
        /// The name from `hello`, if the client introduced itself.
        name: Option<String>,
    },
    /// A Unix client that was announced with [`LocalEvent::RobotConnected`] went away.
    RobotDisconnected,
}

/// Why the local API could not start. Each variant names the path or address and the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The UDP address could not be bound (in use, not a local address, privileged port).
    #[error("cannot bind the local telemetry UDP port {addr}: {source}")]
    UdpBind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// Another process (probably another agent) is listening on the socket path.
    #[error(
        "another process is listening on the local socket {}; stop it or configure another path",
        path.display()
    )]
    SocketInUse {
        /// The configured path.
        path: PathBuf,
    },
    /// Something that is not a socket (a file, a directory, a symlink) is in the way; it is not
    /// removed, because it is not ours to remove.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The configured path.
        path: PathBuf,
    },
    /// A filesystem step on the socket path failed.
    #[error("cannot {action} the local socket {}: {source}", path.display())]
    Unix {
        /// The configured path.
        path: PathBuf,
        /// What was being done (`bind`, `remove the stale file of`, ...).
        action: &'static str,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
}

/// Knobs the tests turn down; production uses [`Limits::default`].
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_line: usize,
    client_queue: usize,
    hello_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_line: MAX_LINE, client_queue: CLIENT_QUEUE, hello_grace: HELLO_GRACE }
    }
}

/// The running local API. Dropping it stops the listeners too (without waiting for them);
/// [`LocalApi::shutdown`] stops them and waits.
pub struct LocalApi {
    /// The bound UDP address, with the real port.
    udp_addr: Option<SocketAddr>,
    /// The socket file we created, to remove at shutdown.
    socket: Option<SocketFile>,
    /// The live Unix clients, shared with the tasks that serve them.
    clients: Arc<Clients>,
    /// Set to `true` at shutdown; every task watches it.
    shutdown: watch::Sender<bool>,
    /// The UDP and Unix listener tasks. Each waits for its connections before it ends.
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for LocalApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApi")
            .field("udp", &self.udp_addr)
            .field("unix", &self.unix_path())
            .field("robots", &self.robots_connected())
            .finish()
    }
}

impl LocalApi {
    /// Binds both inputs (either may be `None`) and starts serving them. Events go to `events`
    /// with `send().await`, so a full channel slows the robot down rather than losing frames.
    ///
    /// For the Unix path: a socket file nobody answers on is stale and replaced; one that
    /// answers belongs to another process and is an error ([`LocalError::SocketInUse`]).
    pub async fn bind(cfg: &LocalConfig, events: mpsc::Sender<LocalEvent>) -> Result<LocalApi, LocalError> {
        Self::bind_with(cfg, events, Limits::default()).await
    }

    async fn bind_with(
        cfg: &LocalConfig,
        events: mpsc::Sender<LocalEvent>,
        limits: Limits,
    ) -> Result<LocalApi, LocalError> {
        let udp = match cfg.udp {
            Some(addr) => {
                let sock = UdpSocket::bind(addr).await.map_err(|source| LocalError::UdpBind { addr, source })?;
                if !addr.ip().is_loopback() {
                    warn!(%addr, "the local telemetry UDP port is not on a loopback address: other machines can send telemetry as this robot");
                }
                let bound = sock.local_addr().map_err(|source| LocalError::UdpBind { addr, source })?;
                Some((sock, bound))
            }
            None => None,
        };
        let unix = match &cfg.unix {
            Some(path) => Some(bind_unix(path).await?),
            None => None,
        };

        let (shutdown, _) = watch::channel(false);
        let clients = Arc::new(Clients::default());
        let mut tasks = Vec::new();
        let udp_addr = udp.as_ref().map(|(_, a)| *a);
        if let Some((sock, addr)) = udp {
            info!(%addr, "local telemetry UDP port open");
            tasks.push(tokio::spawn(serve_udp(sock, events.clone(), shutdown.subscribe())));
        }
        let socket = match unix {
            Some((listener, file)) => {
                info!(path = %file.path.display(), "local robot socket open");
                let task = serve_unix(listener, clients.clone(), events, shutdown.subscribe(), limits);
                tasks.push(tokio::spawn(task));
                Some(file)
            }
            None => None,
        };
        Ok(LocalApi { udp_addr, socket, clients, shutdown, tasks })
    }

    /// The bound UDP address (with the real port when the configuration said port 0).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    /// The Unix socket's path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|s| s.path.as_path())
    }

    /// How many Unix clients are connected right now (announced or not).
    pub fn robots_connected(&self) -> usize {
        self.clients.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Sends `msg` as one line to every Unix client and returns how many took it. Never waits:
    /// a client whose queue ([`CLIENT_QUEUE`] lines) is full is not reading, and is disconnected
    /// with a warning instead.
    pub fn broadcast(&self, msg: &Value) -> usize {
        self.clients.broadcast(&line_of(msg))
    }

    /// Stops listening, closes every client, waits for the tasks and removes the socket file.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = task.await {
                warn!(error = %e, "a local API task failed");
            }
        }
        if let Some(file) = self.socket.take() {
            file.remove();
        }
    }
}

impl Drop for LocalApi {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(file) = self.socket.take() {
            file.remove();
        }
    }
}

/// The socket file we created, identified by device and inode so that shutdown never removes a
/// file someone else put there since.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn remove(self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "cannot remove the local socket file");
                }
            }
            Ok(_) => debug!(path = %self.path.display(), "the socket file was replaced by someone else; leaving it"),
            Err(_) => {}
        }
    }
}

async fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), LocalError> {
    let fail = |action: &'static str| move |source| LocalError::Unix { path: path.to_owned(), action, source };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(fail("create the directory of"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
                Ok(Ok(_)) | Err(_) => return Err(LocalError::SocketInUse { path: path.to_owned() }),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    info!(path = %path.display(), "removing a stale local socket file (nobody listens on it)");
                    std::fs::remove_file(path).map_err(fail("remove the stale file of"))?;
                }
                Ok(Err(e)) => return Err(fail("probe the existing file of")(e)),
            }
        }
        Ok(_) => return Err(LocalError::NotASocket { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("inspect")(e)),
    }
    let listener = UnixListener::bind(path).map_err(fail("bind"))?;
    let file = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile { path: path.to_owned(), dev: meta.dev(), ino: meta.ino() })
    })();
    match file {
        Ok(file) => Ok((listener, file)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(fail("set the mode of")(e))
        }
    }
}

/// The live Unix clients, by connection id.
#[derive(Default)]
struct Clients {
    map: Mutex<HashMap<u64, Client>>,
    next_id: AtomicU64,
}

/// How the rest of the agent reaches one Unix client.
struct Client {
    /// The client's outgoing lines. Bounded: when full, the client is dropped, not waited for.
    tx: mpsc::Sender<Bytes>,
    /// The client's writer task. Aborting it drops the client: the socket's write side closes
    /// and the connection task, seeing its writer gone, closes the rest.
    writer: AbortHandle,
}

impl Clients {
    fn register(&self, tx: mpsc::Sender<Bytes>, writer: AbortHandle) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Client { tx, writer });
        id
    }

    fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn broadcast(&self, line: &Bytes) -> usize {
        let mut sent = 0;
        self.lock().retain(|id, c| match c.tx.try_send(line.clone()) {
            Ok(()) => {
                sent += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    client = id,
                    queued = c.tx.max_capacity(),
                    "a robot client is not reading its socket; disconnecting it"
                );
                c.writer.abort();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        sent
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Client>> {
        // A panic elsewhere while holding the lock leaves the map consistent (every operation on
        // it is a single insert, remove or retain), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One JSON value as a newline-terminated line.
fn line_of(msg: &Value) -> Bytes {
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// A message from the robot, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// `hello`: answered with `welcome`.
    Hello {
        /// The robot software's name, if given.
        name: Option<String>,
    },
    /// `telemetry` or `command_result`, ready for the agent.
    Event(LocalEvent),
}

/// Why a message from the robot was refused; sent back as
/// `{"type":"error","code":..,"message":..}` (plus `correlationID` when it could be read).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The error code (its wire name goes in `code`).
    pub code: ErrorCode,
    /// A sentence saying what was wrong.
    pub message: String,
    /// The refused `command_result`'s `correlationID`, when it could be read.
    pub correlation_id: Option<String>,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into(), correlation_id: None }
    }

    /// The `error` message for the robot.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"type": "error", "code": self.code.as_str(), "message": self.message});
        if let Some(c) = &self.correlation_id {
            v["correlationID"] = Value::String(c.clone());
        }
        v
    }
}

/// Decodes one message from the robot (a datagram, or a line without its newline). Unknown
/// fields are ignored. Which transport may carry what is the caller's business.
pub fn decode(bytes: &[u8]) -> Result<Inbound, Refusal> {
    use ErrorCode::{InvalidPayload, MalformedJson, UnknownType};
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Refusal::new(MalformedJson, format!("the message is not valid JSON: {e}")))?;
    let Value::Object(mut m) = value else {
        return Err(Refusal::new(MalformedJson, "a message must be a JSON object"));
    };
    let ty = match m.remove("type") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(Refusal::new(UnknownType, "\"type\" must be a string")),
        None => {
            return Err(Refusal::new(
                UnknownType,
                "the message has no \"type\"; expected telemetry, command_result or hello",
            ));
        }
    };
    match ty.as_str() {
        "telemetry" => decode_telemetry(m).map_err(|msg| Refusal::new(InvalidPayload, msg)),
        "command_result" => {
            let correlation_id = match m.get("correlationID") {
                Some(Value::String(c)) if !c.is_empty() => Some(c.clone()),
                _ => None,
            };
            decode_command_result(m).map_err(|msg| Refusal { code: InvalidPayload, message: msg, correlation_id })
        }
        "hello" => match m.remove("name") {
            None | Some(Value::Null) => Ok(Inbound::Hello { name: None }),
            Some(Value::String(n)) if (1..=128).contains(&n.chars().count()) => Ok(Inbound::Hello { name: Some(n) }),
            Some(_) => Err(Refusal::new(InvalidPayload, "hello's \"name\" must be a string of 1-128 characters")),
        },
        other => Err(Refusal::new(
            UnknownType,
            format!("unknown type \"{}\"; expected telemetry, command_result or hello", shorten(other)),
        )),
    }
}

fn decode_telemetry(mut m: Map<String, Value>) -> Result<Inbound, String> {
    let stream = match m.remove("stream") {
        Some(Value::String(s)) if valid_name(&s) => s,
        Some(Value::String(s)) => {
            return Err(format!("\"stream\" must be 1-64 characters of A-Z a-z 0-9 _ . - (got \"{}\")", shorten(&s)));
        }
        Some(_) => return Err("\"stream\" must be a string".into()),
        None => return Err("telemetry needs a \"stream\" (a name such as \"nav\")".into()),
    };
    let subtype = match m.remove("subtype") {
        None | Some(Value::Null) => DEFAULT_SUBTYPE.to_owned(),
        Some(Value::String(s)) if valid_name(&s) => s,
        Some(_) => return Err("\"subtype\" must be a string of 1-64 characters of A-Z a-z 0-9 _ . -".into()),
    };
    let timestamp = match m.remove("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_f64().is_some_and(|t| t.is_finite() && t >= 0.0) => n.as_f64(),
        Some(_) => return Err("\"timestamp\" must be a number: device time in ms since the Unix epoch".into()),
    };
    let data = match m.remove("data") {
        Some(d @ Value::Object(_)) => d,
        Some(_) => return Err("telemetry's \"data\" must be a JSON object".into()),
        None => return Err("telemetry needs a \"data\" object".into()),
    };
    Ok(Inbound::Event(LocalEvent::Telemetry { stream, subtype, timestamp, data }))
}

fn decode_command_result(mut m: Map<String, Value>) -> Result<Inbound, String> {
    let correlation_id = match m.remove("correlationID") {
        Some(Value::String(c)) if !c.is_empty() => c,
        Some(_) => return Err("\"correlationID\" must be a non-empty string".into()),
        None => return Err("command_result needs the \"correlationID\" of the app_command it answers".into()),
    };
    let ok = match m.remove("ok") {
        Some(Value::Bool(b)) => b,
        _ => return Err("command_result needs \"ok\": true or false".into()),
    };
    let error = match m.remove("error") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) => Some(e),
        Some(_) => return Err("command_result's \"error\" must be a string".into()),
    };
    let data = match m.remove("data") {
        None | Some(Value::Null) => None,
        Some(d) => Some(d),
    };
    Ok(Inbound::Event(LocalEvent::CommandResult { correlation_id, ok, error, data }))
}

/// A stream or subtype name: 1-64 characters of `[A-Za-z0-9_.-]`.
fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Robot-supplied text quoted in an error, cut to a readable length.
fn shorten(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Hands an event to the agent, waiting for room; gives up only at shutdown. False when the
/// event was not delivered (shutdown, or the agent dropped its receiver).
async fn emit(events: &mpsc::Sender<LocalEvent>, shutdown: &mut watch::Receiver<bool>, ev: LocalEvent) -> bool {
    tokio::select! {
        r = events.send(ev) => r.is_ok(),
        () = stopped(shutdown) => false,
    }
}

/// Resolves once shutdown is signalled (or the [`LocalApi`] is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here, not across the caller's await.
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn serve_udp(sock: UdpSocket, events: mpsc::Sender<LocalEvent>, mut shutdown: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            () = stopped(&mut shutdown) => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(e) => {
                    debug!(error = %e, "local UDP receive failed");
                    // Do not spin if the error repeats.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let refusal = match decode(&buf[..n]) {
            Ok(Inbound::Event(ev @ LocalEvent::Telemetry { .. })) => {
                if !emit(&events, &mut shutdown, ev).await && events.is_closed() {
                    debug!("the agent stopped taking local events; UDP telemetry is discarded");
                }
                continue;
            }
            Ok(Inbound::Hello { .. }) => Refusal::new(
                ErrorCode::NotAllowed,
                "hello is only for the Unix socket; the UDP port takes telemetry only",
            ),
            Ok(Inbound::Event(_)) => Refusal::new(
                ErrorCode::NotAllowed,
                "command_result is only accepted on the Unix socket; the UDP port takes telemetry only",
            ),
            Err(r) => r,
        };
        debug!(%from, code = %refusal.code, "refused a local UDP datagram: {}", refusal.message);
        if let Err(e) = sock.send_to(&line_of(&refusal.to_json()), from).await {
            debug!(%from, error = %e, "cannot send an error datagram back");
        }
    }
}

async fn serve_unix(
    listener: UnixListener,
    clients: Arc<Clients>,
    events: mpsc::Sender<LocalEvent>,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "a robot connection task failed");
                }
            }
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let (rd, wr) = stream.into_split();
                    let (tx, rx) = mpsc::channel(limits.client_queue);
                    // The writer is a task of its own so that lines keep flowing to the client
                    // while its connection task waits for the agent to take an event.
                    let writer = tokio::spawn(write_lines(wr, rx));
                    let id = clients.register(tx.clone(), writer.abort_handle());
                    let conn = Conn { id, tx, events: events.clone(), shutdown: shutdown.clone(), announced: false };
                    conns.spawn(conn.serve(rd, writer, clients.clone(), limits));
                }
                Err(e) => {
                    // Usually out of file descriptors: wait for some to be released.
                    warn!(error = %e, "cannot accept a robot connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    while let Some(done) = conns.join_next().await {
        if let Err(e) = done {
            warn!(error = %e, "a robot connection task failed");
        }
    }
}

/// The outcome of [`read_line`].
enum Line {
    /// `buf` holds a line (without its newline; the last line may lack one).
    Complete,
    /// The client closed its side and nothing is left.
    Eof,
    /// The line passed the limit; the stream is no longer in sync.
    TooLong,
}

/// Reads up to the next newline into `buf` without letting it grow past `max` bytes.
/// Cancel-safe: bytes taken from the reader are already in `buf`, so calling it again after a
/// cancelled call continues the same line.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() { Line::Eof } else { Line::Complete });
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(Line::Complete);
        }
    }
}

/// Why a Unix connection ended.
#[derive(Debug)]
enum End {
    Shutdown,
    /// [`LocalApi::broadcast`] found its queue full and aborted its writer.
    Kicked,
    /// Its own answers overflowed its queue.
    Overflow,
    Eof,
    TooLong,
    /// Reading failed.
    Read(io::Error),
    /// Writing failed (the client went away).
    Write(io::Error),
}

/// One Unix client's connection, as its task sees it.
struct Conn {
    id: u64,
    /// Our handle on the client's outgoing queue (for `welcome` and `error`).
    tx: mpsc::Sender<Bytes>,
    events: mpsc::Sender<LocalEvent>,
    shutdown: watch::Receiver<bool>,
    /// Whether [`LocalEvent::RobotConnected`] was sent (so `RobotDisconnected` is owed).
    announced: bool,
}

impl Conn {
    /// Reads the client's lines until it leaves, misbehaves, is kicked or the API shuts down;
    /// then unregisters it and ends its writer.
    async fn serve(
        mut self,
        rd: OwnedReadHalf,
        mut writer: JoinHandle<io::Result<()>>,
        clients: Arc<Clients>,
        limits: Limits,
    ) {
        debug!(client = self.id, "robot client connected");
        let mut rd = BufReader::new(rd);
        let grace = tokio::time::sleep(limits.hello_grace);
        tokio::pin!(grace);
        let mut shutdown = self.shutdown.clone();
        let mut buf = Vec::new();
        let end = loop {
            tokio::select! {
                () = stopped(&mut shutdown) => break End::Shutdown,
                r = &mut writer => break match r {
                    Ok(Ok(())) => End::Write(io::ErrorKind::BrokenPipe.into()),
                    Ok(Err(e)) => End::Write(e),
                    Err(e) if e.is_cancelled() => End::Kicked,
                    Err(e) => End::Write(io::Error::other(e.to_string())),
                },
                () = &mut grace, if !self.announced => self.announce(None).await,
                r = read_line(&mut rd, &mut buf, limits.max_line) => match r {
                    Ok(Line::Complete) => {
                        let handled = self.handle(&buf).await;
                        buf.clear();
                        if let Err(end) = handled {
                            break end;
                        }
                    }
                    Ok(Line::Eof) => break End::Eof,
                    Ok(Line::TooLong) => {
                        let refusal = Refusal::new(
                            ErrorCode::FrameTooLarge,
                            format!("a line is limited to {} bytes; closing the connection", limits.max_line),
                        );
                        break self.reply(&refusal.to_json()).err().unwrap_or(End::TooLong);
                    }
                    Err(e) => break End::Read(e),
                },
            }
        };
        clients.unregister(self.id);
        match &end {
            End::Overflow => warn!(client = self.id, "a robot client does not read its answers; disconnecting it"),
            End::Read(e) | End::Write(e) => debug!(client = self.id, error = %e, "robot connection failed"),
            _ => debug!(client = self.id, reason = ?end, "robot connection closing"),
        }
        let Conn { id, tx, events, mut shutdown, announced } = self;
        drop(tx);
        drop(rd);
        if !matches!(end, End::Kicked | End::Write(_)) {
            // Let the last answers (the frame_too_large error) reach a client that is leaving
            // anyway: with every sender gone the writer drains the queue and shuts the socket.
            let drain = matches!(end, End::Eof | End::TooLong);
            if !(drain && tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await.is_ok()) {
                writer.abort();
                let _ = writer.await;
            }
        }
        if announced {
            info!(client = id, "robot software disconnected");
            emit(&events, &mut shutdown, LocalEvent::RobotDisconnected).await;
        }
    }

    async fn handle(&mut self, line: &[u8]) -> Result<(), End> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        match decode(line) {
            Ok(Inbound::Hello { name }) => {
                // `welcome` is queued before the agent hears of the robot, so it comes before
                // anything the agent sends on hearing of it (held app commands, a safety stop).
                self.reply(&json!({"type": "welcome", "agent": concat!("tether-device ", env!("CARGO_PKG_VERSION"))}))?;
                if !self.announced {
                    self.announce(name).await;
                }
                Ok(())
            }
            Ok(Inbound::Event(ev)) => {
                if !self.announced {
                    self.announce(None).await;
                }
                emit(&self.events, &mut self.shutdown, ev).await;
                Ok(())
            }
            Err(refusal) => {
                debug!(client = self.id, code = %refusal.code, "refused a line from the robot: {}", refusal.message);
                self.reply(&refusal.to_json())
            }
        }
    }

    async fn announce(&mut self, name: Option<String>) {
        self.announced = true;
        info!(client = self.id, name = name.as_deref().unwrap_or("-"), "robot software connected");
        emit(&self.events, &mut self.shutdown, LocalEvent::RobotConnected { name }).await;
    }

    /// Queues an answer for this client; a full queue means it is not reading.
    fn reply(&self, msg: &Value) -> Result<(), End> {
        match self.tx.try_send(line_of(msg)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(End::Overflow),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Eof),
        }
    }
}

/// Writes queued lines to the client until every sender is gone, then shuts the socket's write
/// side so the client sees the end.
async fn write_lines(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) -> io::Result<()> {
    while let Some(line) = rx.recv().await {
        wr.write_all(&line).await?;
    }
    wr.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn sock_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("robot.sock")
    }

    async fn start(dir: &tempfile::TempDir, limits: Limits) -> (LocalApi, mpsc::Receiver<LocalEvent>) {
        let (tx, rx) = mpsc::channel(64);
        let cfg = LocalConfig { udp: Some("127.0.0.1:0".parse().unwrap()), unix: Some(sock_path(dir)) };
        (LocalApi::bind_with(&cfg, tx, limits).await.unwrap(), rx)
    }

    async fn next_event(rx: &mut mpsc::Receiver<LocalEvent>) -> LocalEvent {
        tokio::time::timeout(WAIT, rx.recv()).await.expect("an event in time").expect("the channel is open")
    }

    /// The next telemetry or command result, skipping connection events.
    async fn next_data_event(rx: &mut mpsc::Receiver<LocalEvent>) -> LocalEvent {
        loop {
            match next_event(rx).await {
                LocalEvent::RobotConnected { .. } | LocalEvent::RobotDisconnected => continue,
                ev => return ev,
            }
        }
    }

    struct Client {
        lines: Lines<BufReader<OwnedReadHalf>>,
        wr: OwnedWriteHalf,
    }

    impl Client {
        async fn connect(path: &Path) -> Client {
            let (rd, wr) = UnixStream::connect(path).await.unwrap().into_split();
            Client { lines: BufReader::new(rd).lines(), wr }
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.wr.write_all(bytes).await.unwrap();
        }

        async fn send(&mut self, v: Value) {
            self.send_raw(&line_of(&v)).await;
        }

        /// The next line as JSON, or `None` at the end of the stream.
        async fn recv(&mut self) -> Option<Value> {
            let line = tokio::time::timeout(WAIT, self.lines.next_line()).await.expect("a line in time").ok()??;
            Some(serde_json::from_str(&line).unwrap())
        }
    }

    fn telemetry(stream: &str, n: u64) -> Value {
        json!({"type":"telemetry","stream":stream,"data":{"n":n}})
    }

    #[tokio::test]
    async fn udp_telemetry_becomes_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let to = api.udp_addr().unwrap();
        assert_ne!(to.port(), 0);
        let robot = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let msg = json!({"type":"telemetry","stream":"nav","subtype":"gps_fix","timestamp":1732200000123u64,"data":{"lat":37.8},"extra":1});
        robot.send_to(&serde_json::to_vec(&msg).unwrap(), to).await.unwrap();
        assert_eq!(
            next_event(&mut rx).await,
            LocalEvent::Telemetry {
                stream: "nav".into(),
                subtype: "gps_fix".into(),
                timestamp: Some(1732200000123.0),
                data: json!({"lat":37.8}),
            }
        );
        robot.send_to(br#"{"type":"telemetry","stream":"imu","data":{}}"#, to).await.unwrap();
        assert_eq!(
            next_event(&mut rx).await,
            LocalEvent::Telemetry {
                stream: "imu".into(),
                subtype: "sensor_data".into(),
                timestamp: None,
                data: json!({})
            }
        );
        api.shutdown().await;
    }

    #[tokio::test]
    async fn bad_datagrams_are_answered_with_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let to = api.udp_addr().unwrap();
        let robot = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cases: [(&[u8], &str); 5] = [
            (b"not json", "malformed_json"),
            (b"[1,2]", "malformed_json"),
            (br#"{"type":"teleport"}"#, "unknown_type"),
            (br#"{"type":"telemetry","stream":"no spaces","data":{}}"#, "invalid_payload"),
            (br#"{"type":"command_result","correlationID":"c-1","ok":true}"#, "not_allowed"),
        ];
        let mut buf = vec![0u8; 4096];
        for (datagram, code) in cases {
            robot.send_to(datagram, to).await.unwrap();
            let (n, _) = tokio::time::timeout(WAIT, robot.recv_from(&mut buf)).await.unwrap().unwrap();
            let err: Value = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(err["type"], "error");
            assert_eq!(err["code"], code, "for {}", String::from_utf8_lossy(datagram));
            assert!(err["message"].as_str().unwrap().len() > 10);
        }
        robot.send_to(&serde_json::to_vec(&telemetry("nav", 1)).unwrap(), to).await.unwrap();
        assert!(matches!(next_event(&mut rx).await, LocalEvent::Telemetry { .. }));
        api.shutdown().await;
    }

    #[tokio::test]
    async fn unix_telemetry_becomes_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let mut c = Client::connect(api.unix_path().unwrap()).await;
        c.send(json!({"type":"telemetry","stream":"nav","timestamp":5.5,"data":{"gps":{"speed":2.5}}})).await;
        // The first line announces the robot, nameless since it skipped hello.
        assert_eq!(next_event(&mut rx).await, LocalEvent::RobotConnected { name: None });
        assert_eq!(
            next_event(&mut rx).await,
            LocalEvent::Telemetry {
                stream: "nav".into(),
                subtype: "sensor_data".into(),
                timestamp: Some(5.5),
                data: json!({"gps":{"speed":2.5}}),
            }
        );
        // CRLF line endings are fine too.
        c.send_raw(b"{\"type\":\"telemetry\",\"stream\":\"a.b-c_d\",\"data\":{}}\r\n").await;
        assert!(matches!(next_data_event(&mut rx).await, LocalEvent::Telemetry { stream, .. } if stream == "a.b-c_d"));
        api.shutdown().await;
    }

    #[tokio::test]
    async fn command_results_become_events() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let mut c = Client::connect(api.unix_path().unwrap()).await;
        c.send(json!({"type":"command_result","correlationID":"c-1","ok":true,"data":{"target":[1,2]}})).await;
        c.send(json!({"type":"command_result","correlationID":"c-2","ok":false,"error":"no such waypoint"})).await;
        assert_eq!(
            next_data_event(&mut rx).await,
            LocalEvent::CommandResult {
                correlation_id: "c-1".into(),
                ok: true,
                error: None,
                data: Some(json!({"target":[1,2]})),
            }
        );
        assert_eq!(
            next_data_event(&mut rx).await,
            LocalEvent::CommandResult {
                correlation_id: "c-2".into(),
                ok: false,
                error: Some("no such waypoint".into()),
                data: None,
            }
        );
        api.shutdown().await;
    }

    #[tokio::test]
    async fn hello_is_welcomed_and_the_robot_announced() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let mut c = Client::connect(api.unix_path().unwrap()).await;
        c.send(json!({"type":"hello","name":"boat-sim"})).await;
        let welcome = c.recv().await.unwrap();
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["agent"], format!("tether-device {}", env!("CARGO_PKG_VERSION")));
        assert_eq!(next_event(&mut rx).await, LocalEvent::RobotConnected { name: Some("boat-sim".into()) });
        assert_eq!(api.robots_connected(), 1);
        drop(c);
        assert_eq!(next_event(&mut rx).await, LocalEvent::RobotDisconnected);
        assert_eq!(api.robots_connected(), 0);
        api.shutdown().await;
    }

    #[tokio::test]
    async fn a_silent_client_is_announced_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { hello_grace: Duration::from_millis(50), ..Limits::default() };
        let (api, mut rx) = start(&dir, limits).await;
        let c = Client::connect(api.unix_path().unwrap()).await;
        assert_eq!(next_event(&mut rx).await, LocalEvent::RobotConnected { name: None });
        drop(c);
        assert_eq!(next_event(&mut rx).await, LocalEvent::RobotDisconnected);
        api.shutdown().await;
    }

    #[tokio::test]
    async fn bad_lines_get_errors_and_the_connection_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let mut c = Client::connect(api.unix_path().unwrap()).await;
        let mut other = Client::connect(api.unix_path().unwrap()).await;
        let cases: [(&str, &str); 12] = [
            ("{not json", "malformed_json"),
            ("\"a string\"", "malformed_json"),
            ("{\"stream\":\"nav\"}", "unknown_type"),
            ("{\"type\":7}", "unknown_type"),
            ("{\"type\":\"app_command\"}", "unknown_type"),
            ("{\"type\":\"telemetry\",\"data\":{}}", "invalid_payload"),
            ("{\"type\":\"telemetry\",\"stream\":\"\",\"data\":{}}", "invalid_payload"),
            ("{\"type\":\"telemetry\",\"stream\":\"nav\",\"data\":[1]}", "invalid_payload"),
            ("{\"type\":\"telemetry\",\"stream\":\"nav\",\"timestamp\":\"now\",\"data\":{}}", "invalid_payload"),
            ("{\"type\":\"command_result\",\"ok\":true}", "invalid_payload"),
            ("{\"type\":\"command_result\",\"correlationID\":\"c-9\",\"ok\":\"yes\"}", "invalid_payload"),
            ("{\"type\":\"hello\",\"name\":42}", "invalid_payload"),
        ];
        for (line, code) in cases {
            c.send_raw(format!("{line}\n").as_bytes()).await;
            let err = c.recv().await.expect("an answer, not a closed connection");
            assert_eq!(err["type"], "error");
            assert_eq!(err["code"], code, "for {line}");
            assert!(!err["message"].as_str().unwrap().is_empty());
        }
        // A refused command_result names the correlationID it could read.
        c.send(json!({"type":"command_result","correlationID":"c-9","ok":1})).await;
        assert_eq!(c.recv().await.unwrap()["correlationID"], "c-9");
        // Blank lines are ignored, and the same connection still works.
        c.send_raw(b"\n\n").await;
        c.send(telemetry("nav", 1)).await;
        assert!(matches!(next_data_event(&mut rx).await, LocalEvent::Telemetry { data, .. } if data["n"] == 1));
        // The other client was never disturbed.
        other.send(telemetry("other", 2)).await;
        assert!(matches!(next_data_event(&mut rx).await, LocalEvent::Telemetry { stream, .. } if stream == "other"));
        api.shutdown().await;
    }

    #[tokio::test]
    async fn an_over_long_line_is_refused_and_the_connection_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let mut other = Client::connect(api.unix_path().unwrap()).await;
        let (rd, mut wr) = UnixStream::connect(api.unix_path().unwrap()).await.unwrap().into_split();
        let mut lines = BufReader::new(rd).lines();
        // The agent stops reading mid-line, so write from another task.
        let writer = tokio::spawn(async move {
            let mut big = br#"{"type":"telemetry","stream":"nav","data":{"blob":""#.to_vec();
            big.resize(MAX_LINE + 100, b'a');
            let _ = wr.write_all(&big).await;
        });
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
        let err: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(err["code"], "frame_too_large");
        assert!(tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().is_none(), "then closed");
        writer.await.unwrap();
        // A line of exactly the limit still passes, on another connection.
        let mut ok = br#"{"type":"telemetry","stream":"nav","data":{"blob":""#.to_vec();
        ok.resize(MAX_LINE - 3, b'a');
        ok.extend_from_slice(b"\"}}\n");
        other.send_raw(&ok).await;
        let ev = next_data_event(&mut rx).await;
        assert!(matches!(ev, LocalEvent::Telemetry { data, .. } if data["blob"].as_str().unwrap().len() > 1_000_000));
        api.shutdown().await;
    }

    #[tokio::test]
    async fn broadcast_reaches_every_client() {
        let dir = tempfile::tempdir().unwrap();
        let (api, _rx) = start(&dir, Limits::default()).await;
        let mut a = Client::connect(api.unix_path().unwrap()).await;
        let mut b = Client::connect(api.unix_path().unwrap()).await;
        for c in [&mut a, &mut b] {
            c.send(json!({"type":"hello"})).await;
            assert_eq!(c.recv().await.unwrap()["type"], "welcome");
        }
        assert_eq!(api.robots_connected(), 2);
        let cmd = json!({"type":"app_command","correlationID":"c-1","command":"set_waypoint","data":{"latitude":37.8,"longitude":-122.4},"from":"pilot-1"});
        assert_eq!(api.broadcast(&cmd), 2);
        let stop = json!({"type":"safety_stop","policy":"stop","reason":"link_lost","timestamp":1.0});
        assert_eq!(api.broadcast(&stop), 2);
        for c in [&mut a, &mut b] {
            assert_eq!(c.recv().await.unwrap(), cmd);
            assert_eq!(c.recv().await.unwrap(), stop);
        }
        api.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_without_blocking_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { client_queue: 4, ..Limits::default() };
        let (api, _rx) = start(&dir, limits).await;
        let mut reader = Client::connect(api.unix_path().unwrap()).await;
        let mut sleeper = Client::connect(api.unix_path().unwrap()).await;
        for c in [&mut reader, &mut sleeper] {
            c.send(json!({"type":"hello"})).await;
            assert_eq!(c.recv().await.unwrap()["type"], "welcome");
        }
        let blob = "x".repeat(64 * 1024);
        let mut dropped_after = None;
        // The sleeper's socket buffer and then its 4-line queue fill up; broadcast never waits.
        for i in 0..200u64 {
            let sent = api.broadcast(&json!({"type":"app_command","correlationID":i.to_string(),"data":blob}));
            assert_eq!(reader.recv().await.unwrap()["correlationID"], i.to_string());
            if sent == 1 {
                dropped_after = Some(i);
                break;
            }
            assert_eq!(sent, 2);
        }
        assert!(dropped_after.is_some(), "the sleeper is dropped once its queue is full");
        tokio::time::timeout(WAIT, async {
            while api.robots_connected() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(api.broadcast(&json!({"type":"safety_clear","reason":"back"})), 1);
        assert_eq!(reader.recv().await.unwrap()["type"], "safety_clear");
        // The sleeper gets what was already in its socket (the last line possibly cut short: the
        // write in progress is abandoned), then the end.
        while tokio::time::timeout(WAIT, sleeper.lines.next_line()).await.unwrap().unwrap().is_some() {}
        api.shutdown().await;
    }

    #[tokio::test]
    async fn telemetry_waits_for_the_agent_rather_than_being_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let cfg = LocalConfig { udp: None, unix: Some(sock_path(&dir)) };
        let api = LocalApi::bind(&cfg, tx).await.unwrap();
        assert_eq!(api.udp_addr(), None);
        let mut c = Client::connect(api.unix_path().unwrap()).await;
        for n in 0..20 {
            c.send(telemetry("nav", n)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for n in 0..20 {
            assert!(matches!(next_data_event(&mut rx).await, LocalEvent::Telemetry { data, .. } if data["n"] == n));
        }
        api.shutdown().await;
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced_with_mode_0660() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock_path(&dir);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "the dead listener left its file");
        let (api, mut rx) = start(&dir, Limits::default()).await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let mut c = Client::connect(&path).await;
        c.send(telemetry("nav", 1)).await;
        assert!(matches!(next_data_event(&mut rx).await, LocalEvent::Telemetry { .. }));
        api.shutdown().await;
    }

    #[tokio::test]
    async fn a_live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, mut rx) = start(&dir, Limits::default()).await;
        let (tx, _rx2) = mpsc::channel(1);
        let cfg = LocalConfig { udp: None, unix: Some(sock_path(&dir)) };
        let err = LocalApi::bind(&cfg, tx).await.unwrap_err();
        assert!(matches!(err, LocalError::SocketInUse { .. }), "{err:?}");
        assert!(err.to_string().contains(&sock_path(&dir).display().to_string()), "{err}");
        // The first agent is untouched, and the probe did not show up as a robot.
        let mut c = Client::connect(first.unix_path().unwrap()).await;
        c.send(telemetry("nav", 1)).await;
        assert!(matches!(next_event(&mut rx).await, LocalEvent::RobotConnected { name: None }));
        assert!(matches!(next_event(&mut rx).await, LocalEvent::Telemetry { .. }));
        first.shutdown().await;
    }

    #[tokio::test]
    async fn something_else_at_the_path_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock_path(&dir);
        std::fs::write(&path, "precious").unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let err = LocalApi::bind(&LocalConfig { udp: None, unix: Some(path.clone()) }, tx).await.unwrap_err();
        assert!(matches!(err, LocalError::NotASocket { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_busy_udp_port_is_reported() {
        let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let err = LocalApi::bind(&LocalConfig { udp: Some(addr), unix: None }, tx).await.unwrap_err();
        assert!(matches!(err, LocalError::UdpBind { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn shutdown_closes_clients_and_removes_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock_path(&dir);
        let (api, _rx) = start(&dir, Limits::default()).await;
        let mut c = Client::connect(&path).await;
        c.send(json!({"type":"hello"})).await;
        assert_eq!(c.recv().await.unwrap()["type"], "welcome");
        tokio::time::timeout(WAIT, api.shutdown()).await.expect("shutdown does not hang");
        assert!(!path.exists());
        assert!(c.recv().await.is_none(), "the client sees the end");
        // The path is free for the next agent.
        let (again, _rx) = start(&dir, Limits::default()).await;
        again.shutdown().await;
    }

    #[tokio::test]
    async fn a_missing_socket_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/tether/robot.sock");
        let (tx, _rx) = mpsc::channel(1);
        let api = LocalApi::bind(&LocalConfig { udp: None, unix: Some(path.clone()) }, tx).await.unwrap();
        assert_eq!(api.unix_path(), Some(path.as_path()));
        drop(api);
        assert!(!path.exists(), "dropping the API removes the file too");
    }

    #[test]
    fn decode_reads_the_local_protocol() {
        assert_eq!(decode(br#"{"type":"hello"}"#), Ok(Inbound::Hello { name: None }));
        assert_eq!(decode(br#"{"type":"hello","name":"x"}"#), Ok(Inbound::Hello { name: Some("x".into()) }));
        let t = decode(br#"{"type":"telemetry","stream":"nav","subtype":null,"timestamp":null,"data":{}}"#);
        assert_eq!(
            t,
            Ok(Inbound::Event(LocalEvent::Telemetry {
                stream: "nav".into(),
                subtype: "sensor_data".into(),
                timestamp: None,
                data: json!({}),
            }))
        );
        let long = "n".repeat(65);
        let e = decode(format!(r#"{{"type":"telemetry","stream":"{long}","data":{{}}}}"#).as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPayload);
        assert!(decode(r#"{"type":"telemetry","stream":"nävigation","data":{}}"#.as_bytes()).is_err());
        assert!(decode(br#"{"type":"telemetry","stream":"nav","timestamp":-1,"data":{}}"#).is_err());
        let e = decode(format!(r#"{{"type":"{}"}}"#, "t".repeat(10_000)).as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert!(e.message.len() < 200, "robot text is shortened in errors");
        assert_eq!(decode(b"\xff\xfe").unwrap_err().code, ErrorCode::MalformedJson);
        let r = Refusal::new(ErrorCode::FrameTooLarge, "too big").to_json();
        assert_eq!(r, json!({"type":"error","code":"frame_too_large","message":"too big"}));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["nav", "a", "A.b-c_9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
