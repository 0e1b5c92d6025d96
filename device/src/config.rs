//! The agent's `config.yaml`, in the WobotRelay seed's format:
//!
//! ```yaml
//! serverAddress: "ws://relay.example.com:8000/ws"
//! handshakeKey: "group-default123"
//! clientID: "dev-3f2a9c"
//! clientSecret: "..."
//! name: "Client-1"
//! logLevel: "info"
//! commandRestartMaxDelay: "5m"
//! paths: {}
//! telemetry:
//!   rateHz: 5
//!   simulator: true
//! ```
//!
//! Keys the agent does not know are kept in `extra`, so that when the agent writes the file back
//! (after onboarding and config updates, with the agent work) nothing is lost.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML is malformed or a field has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What and where (line and column when known).
        message: String,
    },
    /// A field's value is not acceptable.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The field, as a path into the file (`commands.timeout`, `paths.svc.runOnInit`).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A duration written as text in the file: `250ms`, `30s`, `5m`, `1h30m`, or a plain number of
/// seconds. Written back exactly as it was read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_norway::Value", into = "serde_norway::Value")]
pub struct Dur {
    text: serde_norway::Value,
    /// The parsed value.
    pub value: Duration,
}

impl Dur {
    /// A duration from its text form (panics only on a bad literal in this crate's defaults).
    fn lit(text: &str) -> Dur {
        Dur { text: serde_norway::Value::String(text.into()), value: parse_duration(text).unwrap_or_default() }
    }
}

impl TryFrom<serde_norway::Value> for Dur {
    type Error = String;
    fn try_from(v: serde_norway::Value) -> Result<Self, String> {
        let value = match &v {
            serde_norway::Value::String(s) => parse_duration(s)?,
            serde_norway::Value::Number(n) => {
                let s = n.as_f64().filter(|s| s.is_finite() && *s >= 0.0).ok_or("a duration cannot be negative")?;
                Duration::from_secs_f64(s)
            }
            other => return Err(format!("expected a duration like \"30s\", got {other:?}")),
        };
        Ok(Dur { text: v, value })
    }
}

impl From<Dur> for serde_norway::Value {
    fn from(d: Dur) -> Self {
        d.text
    }
}

pub use crate::supervise::parse_duration;

/// What to do with telemetry frames while the link is down and the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum BufferPolicy {
    /// Keep the newest frames, dropping the oldest (default: the pilot sees the latest state).
    #[default]
    DropOldest,
    /// Keep the oldest frames, dropping new ones (keeps the beginning of an incident).
    DropNewest,
}

/// The offline telemetry buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BufferConfig {
    /// Frames kept while the link is down (default 10000).
    #[serde(default = "default_buffer_frames")]
    pub max_frames: usize,
    /// `dropOldest` (default) or `dropNewest` when full.
    #[serde(default)]
    pub policy: BufferPolicy,
}

fn default_buffer_frames() -> usize {
    10_000
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig { max_frames: default_buffer_frames(), policy: BufferPolicy::default() }
    }
}

/// Telemetry sources and publishing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryConfig {
    /// Frames per second from the built-in simulator (default 5).
    #[serde(default = "default_rate")]
    pub rate_hz: f64,
    /// Publish a built-in simulated boat's telemetry as stream `sensor_data` (default false;
    /// the demo runs `tether-boat`, a separate program, instead).
    #[serde(default)]
    pub simulator: bool,
    /// Publish CPU, memory, disk and network metrics as stream `system` (default true).
    #[serde(default = "yes")]
    pub system_metrics: bool,
    /// How often (default 5s, like seed 002's agent).
    #[serde(default = "default_system_interval")]
    pub system_interval: Dur,
    /// Local UDP input for JSON datagrams (default `127.0.0.1:47300`; empty disables it).
    #[serde(default = "default_udp")]
    pub udp: String,
    /// Local Unix socket for JSON lines both ways (default `/run/tether/robot.sock`; empty
    /// disables it).
    #[serde(default = "default_unix_socket")]
    pub unix_socket: String,
    /// Offline buffering.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Buffered frames sent per second after a reconnect, behind live frames (default 50).
    #[serde(default = "default_backfill_rate")]
    pub backfill_rate: f64,
}

fn default_rate() -> f64 {
    5.0
}

fn yes() -> bool {
    true
}

fn default_system_interval() -> Dur {
    Dur::lit("5s")
}

fn default_udp() -> String {
    "127.0.0.1:47300".into()
}

fn default_unix_socket() -> String {
    "/run/tether/robot.sock".into()
}

fn default_backfill_rate() -> f64 {
    50.0
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            rate_hz: default_rate(),
            simulator: false,
            system_metrics: true,
            system_interval: default_system_interval(),
            udp: default_udp(),
            unix_socket: default_unix_socket(),
            buffer: BufferConfig::default(),
            backfill_rate: default_backfill_rate(),
        }
    }
}

/// `execute_command` rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandsConfig {
    /// Programs that may be run: a bare name (`uptime`) allows that name looked up in PATH, a
    /// path (`/usr/bin/df`) allows exactly that file, `"*"` allows anything. Default: none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Allow `shell: true` requests (`sh -c <command>`; the allow list cannot vet those).
    /// Default false.
    #[serde(default)]
    pub allow_shell: bool,
    /// Kill a command after this long unless the request says otherwise (default 30s).
    #[serde(default = "default_command_timeout")]
    pub timeout: Dur,
    /// The longest `timeoutMs` a request may ask for (default 1h).
    #[serde(default = "default_max_timeout")]
    pub max_timeout: Dur,
    /// Output kept per stream (stdout, stderr); the rest is discarded and `truncated` set
    /// (default 65536).
    #[serde(default = "default_max_output")]
    pub max_output_bytes: usize,
    /// Correlation IDs remembered to refuse running a redelivered command twice (default 256).
    #[serde(default = "default_remember")]
    pub remember: usize,
    /// How long the robot software has to answer an app command (default 10s).
    #[serde(default = "default_app_timeout")]
    pub app_command_timeout: Dur,
}

fn default_command_timeout() -> Dur {
    Dur::lit("30s")
}

fn default_max_timeout() -> Dur {
    Dur::lit("1h")
}

fn default_max_output() -> usize {
    65_536
}

fn default_remember() -> usize {
    256
}

fn default_app_timeout() -> Dur {
    Dur::lit("10s")
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            allow: Vec::new(),
            allow_shell: false,
            timeout: default_command_timeout(),
            max_timeout: default_max_timeout(),
            max_output_bytes: default_max_output(),
            remember: default_remember(),
            app_command_timeout: default_app_timeout(),
        }
    }
}

/// What the robot is told to do when a safety stop fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum SafetyPolicy {
    /// Keep station at the current position.
    Hold,
    /// Stop the motors (default).
    #[default]
    Stop,
    /// Go back to the start of the mission.
    Return,
}

impl SafetyPolicy {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SafetyPolicy::Hold => "hold",
            SafetyPolicy::Stop => "stop",
            SafetyPolicy::Return => "return",
        }
    }
}

/// When losing the relay link triggers a safety stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum LinkLossScope {
    /// Whenever the link stays down past the deadline.
    Always,
    /// Only if a pilot held the control lease when the link went down (default).
    #[default]
    WhenControlled,
    /// Never (the robot's own software decides).
    Never,
}

/// The safety stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SafetyConfig {
    /// `hold`, `stop` (default) or `return`.
    #[serde(default)]
    pub policy: SafetyPolicy,
    /// Stop when the relay reports the controlling pilot silent or gone (default true).
    #[serde(default = "yes")]
    pub on_controller_lost: bool,
    /// `always`, `whenControlled` (default) or `never`.
    #[serde(default)]
    pub link_loss: LinkLossScope,
    /// How long the link may be down before the stop (default 10s).
    #[serde(default = "default_link_loss_timeout")]
    pub link_loss_timeout: Dur,
}

fn default_link_loss_timeout() -> Dur {
    Dur::lit("10s")
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            policy: SafetyPolicy::default(),
            on_controller_lost: true,
            link_loss: LinkLossScope::default(),
            link_loss_timeout: default_link_loss_timeout(),
        }
    }
}

/// Camera streaming (used by the video pipeline; validated here so `check` catches mistakes).
/// A STUN or TURN server for WebRTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServerConfig {
    /// `stun:host:port`, `turn:host:port?transport=udp`, `turns:...`.
    pub urls: Vec<String>,
    /// TURN user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VideoConfig {
    /// Stream video at all (default false).
    #[serde(default)]
    pub enabled: bool,
    /// `testpattern` (with a clock overlay, default), `v4l2:/dev/video0`, `rtsp://...` or
    /// `file:/path/clip.mp4`.
    #[serde(default = "default_video_source")]
    pub source: String,
    /// `auto` (default): per session, H.264 constrained baseline when the viewer's offer has it,
    /// else VP8 (Firefox without its OpenH264 plugin offers no H.264). `h264` or `vp8`: that
    /// codec only, and a viewer that does not offer it is refused.
    #[serde(default = "default_codec")]
    pub codec: String,
    /// Pixels (default 1280).
    #[serde(default = "default_width")]
    pub width: u32,
    /// Pixels (default 720).
    #[serde(default = "default_height")]
    pub height: u32,
    /// Frames per second (default 30).
    #[serde(default = "default_framerate")]
    pub framerate: u32,
    /// Starting bitrate in kbit/s (default 1500); it then follows the viewers' feedback.
    #[serde(default = "default_bitrate")]
    pub bitrate_kbps: u32,
    /// Lowest bitrate feedback may push it to (default 150).
    #[serde(default = "default_min_bitrate")]
    pub min_bitrate_kbps: u32,
    /// Highest (default 4000).
    #[serde(default = "default_max_bitrate")]
    pub max_bitrate_kbps: u32,
    /// STUN/TURN servers (default none: host candidates only, fine on one network).
    #[serde(default)]
    pub ice_servers: Vec<IceServerConfig>,
    /// Also offer loopback ICE candidates (default false; for a viewer on the same host).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_loopback: bool,
    /// Seconds between the encoder's own keyframes (default 2; 1 to 3600). Viewers' keyframe
    /// requests are served whatever it is; a longer interval saves uplink.
    #[serde(default = "default_keyframe_interval")]
    pub keyframe_interval: u32,
}

fn default_keyframe_interval() -> u32 {
    2
}

fn default_video_source() -> String {
    "testpattern".into()
}

fn default_codec() -> String {
    "auto".into()
}

fn default_width() -> u32 {
    1280
}

fn default_height() -> u32 {
    720
}

fn default_framerate() -> u32 {
    30
}

fn default_bitrate() -> u32 {
    1500
}

fn default_min_bitrate() -> u32 {
    150
}

fn default_max_bitrate() -> u32 {
    4000
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            enabled: false,
            source: default_video_source(),
            codec: default_codec(),
            width: default_width(),
            height: default_height(),
            framerate: default_framerate(),
            bitrate_kbps: default_bitrate(),
            min_bitrate_kbps: default_min_bitrate(),
            max_bitrate_kbps: default_max_bitrate(),
            ice_servers: Vec::new(),
            include_loopback: false,
            keyframe_interval: default_keyframe_interval(),
        }
    }
}

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// WebSocket URL of the relay's device endpoint, e.g. `ws://host:8000/ws`.
    pub server_address: String,
    /// Fleet handshake key for onboarding (used while `clientID` is empty).
    #[serde(default)]
    pub handshake_key: String,
    /// Identity issued at approval.
    #[serde(rename = "clientID", default)]
    pub client_id: String,
    /// Secret issued at approval.
    #[serde(default)]
    pub client_secret: String,
    /// While waiting for approval: the registration request to poll, so a restart resumes
    /// polling instead of registering again.
    #[serde(rename = "registrationRequestID", default, skip_serializing_if = "Option::is_none")]
    pub registration_request_id: Option<String>,
    /// Display name.
    #[serde(default = "default_name")]
    pub name: String,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Seconds before the first reconnect attempt; doubles (with jitter) up to 30 s
    /// (`reconnectInterval`, env `RECONNECT_INTERVAL`, default 2).
    #[serde(default = "default_reconnect_interval")]
    pub reconnect_interval: f64,
    /// Consecutive failed connection attempts before the agent gives up and exits with code 5;
    /// 0 means never (`maxReconnectAttempts`, env `MAX_RECONNECT_ATTEMPTS`, default 0).
    #[serde(default)]
    pub max_reconnect_attempts: u32,
    /// Seconds without anything from the relay (pongs included; the agent pings every third of
    /// this) before the link is declared dead and re-established
    /// (`connectionTimeout`, env `CONNECTION_TIMEOUT`, default 30).
    #[serde(default = "default_connection_timeout")]
    pub connection_timeout: f64,
    /// PEM file of extra certificate authorities to trust for `wss://` (private deployments);
    /// the public web roots are trusted as well (`caFile`, default none).
    #[serde(rename = "caFile", default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Telemetry sources, local inputs and offline buffering.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `execute_command` allow list and limits, app command timeout.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// The safety stop.
    #[serde(default)]
    pub safety: SafetyConfig,
    /// Camera streaming.
    #[serde(default)]
    pub video: VideoConfig,
    /// Longest wait between restarts of a crashing supervised process (default 5m).
    #[serde(default = "default_restart_max_delay")]
    pub command_restart_max_delay: Dur,
    /// Processes the agent starts and supervises, by name.
    #[serde(default)]
    pub paths: BTreeMap<String, crate::supervise::ProcessSpec>,
    /// Every key the agent does not know, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_norway::Value>,
}

fn default_restart_max_delay() -> Dur {
    Dur::lit("5m")
}

fn default_reconnect_interval() -> f64 {
    2.0
}

fn default_connection_timeout() -> f64 {
    30.0
}

fn default_name() -> String {
    "tether-device".into()
}

fn default_log_level() -> String {
    "info".into()
}

impl Config {
    /// Parses YAML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let c: Config = serde_norway::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        c.validate(path)?;
        Ok(c)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Config::parse(&text, &p)
    }

    /// Writes the config to `path` atomically: a temporary file in the same directory,
    /// flushed to disk, then renamed over the old one. A crash leaves the old file or the new
    /// one, never half of either. Keys the agent does not know are written back unchanged.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let p = path.display().to_string();
        let io = |e: std::io::Error| ConfigError::Read { path: p.clone(), source: e };
        let text = serde_norway::to_string(self)
            .map_err(|e| ConfigError::Parse { path: p.clone(), message: e.to_string() })?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config.yaml".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(b"# Written by tether-device; unknown keys are kept.\n").map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The file holds the device's secret.
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Where the last configuration that validated is kept (`.config.yaml.last-good` beside
    /// the file): the agent falls back to it at startup if config.yaml was broken by hand, so a
    /// bad edit never leaves a boat unreachable.
    pub fn last_good_path(path: &Path) -> std::path::PathBuf {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config.yaml".into());
        path.with_file_name(format!(".{name}.last-good"))
    }

    /// Records this (validated) config as the last good one for `path`.
    pub fn save_last_good(&self, path: &Path) {
        if let Err(e) = self.save(&Config::last_good_path(path)) {
            tracing::warn!("cannot keep a copy of the last good config: {e}");
        }
    }

    /// Applies the seed's environment settings over the file's values. `get` is the source
    /// of variables (the process environment in the binary, a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>, path: &str) -> Result<(), ConfigError> {
        let num = |name: &'static str| -> Result<Option<f64>, ConfigError> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| ConfigError::Invalid {
                    path: path.into(),
                    field: name.into(),
                    message: format!("not a number: {v:?}"),
                }),
            }
        };
        if let Some(v) = num("RECONNECT_INTERVAL")? {
            self.reconnect_interval = v;
        }
        if let Some(v) = num("MAX_RECONNECT_ATTEMPTS")? {
            self.max_reconnect_attempts = v as u32;
        }
        if let Some(v) = num("CONNECTION_TIMEOUT")? {
            self.connection_timeout = v;
        }
        self.validate(path)
    }

    /// Checks every value; the error names the field as a path into the file.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| {
            Err(ConfigError::Invalid { path: path.into(), field: field.into(), message })
        };
        match url::Url::parse(&self.server_address) {
            Ok(u) if u.scheme() == "ws" || u.scheme() == "wss" => {}
            Ok(u) => {
                return bad("serverAddress", format!("scheme must be ws or wss, not {:?}", u.scheme()));
            }
            Err(e) => return bad("serverAddress", format!("{e}: {:?}", self.server_address)),
        }
        if self.client_id.is_empty() != self.client_secret.is_empty() {
            return bad("clientSecret", "clientID and clientSecret must both be set, or both empty".into());
        }
        if self.client_id.is_empty() && self.handshake_key.is_empty() {
            return bad(
                "handshakeKey",
                "without clientID/clientSecret the agent needs a handshakeKey to register".into(),
            );
        }
        if let Some(ca) = &self.ca_file
            && !ca.is_file()
        {
            return bad("caFile", format!("{} is not a readable file", ca.display()));
        }
        if !(self.reconnect_interval > 0.0 && self.reconnect_interval <= 3600.0) {
            return bad(
                "reconnectInterval",
                format!("must be between 0 and 3600 seconds, got {}", self.reconnect_interval),
            );
        }
        if !(self.connection_timeout >= 0.5 && self.connection_timeout <= 3600.0) {
            return bad(
                "connectionTimeout",
                format!("must be between 0.5 and 3600 seconds, got {}", self.connection_timeout),
            );
        }
        let t = &self.telemetry;
        if !(t.rate_hz > 0.0 && t.rate_hz <= 1000.0) {
            return bad("telemetry.rateHz", format!("must be between 0 and 1000, got {}", t.rate_hz));
        }
        if t.system_interval.value < Duration::from_millis(100) {
            return bad("telemetry.systemInterval", "must be at least 100ms".into());
        }
        if !t.udp.is_empty() && t.udp.parse::<std::net::SocketAddr>().is_err() {
            return bad("telemetry.udp", format!("{:?} is not an address like 127.0.0.1:47300", t.udp));
        }
        if t.buffer.max_frames == 0 || t.buffer.max_frames > 10_000_000 {
            return bad(
                "telemetry.buffer.maxFrames",
                format!("must be between 1 and 10000000, got {}", t.buffer.max_frames),
            );
        }
        if !(t.backfill_rate >= 1.0 && t.backfill_rate <= 100_000.0) {
            return bad(
                "telemetry.backfillRate",
                format!("must be between 1 and 100000 frames/s, got {}", t.backfill_rate),
            );
        }
        let c = &self.commands;
        if let Some(e) = c.allow.iter().find(|e| e.trim().is_empty()) {
            return bad("commands.allow", format!("{e:?} is not a program name or path"));
        }
        if c.timeout.value.is_zero() || c.timeout.value > c.max_timeout.value {
            return bad("commands.timeout", "must be above zero and at most commands.maxTimeout".into());
        }
        if c.max_output_bytes == 0 || c.max_output_bytes > 64 << 20 {
            return bad(
                "commands.maxOutputBytes",
                format!("must be between 1 and 67108864, got {}", c.max_output_bytes),
            );
        }
        if c.remember == 0 || c.remember > 100_000 {
            return bad("commands.remember", format!("must be between 1 and 100000, got {}", c.remember));
        }
        if c.app_command_timeout.value.is_zero() {
            return bad("commands.appCommandTimeout", "must be above zero".into());
        }
        if self.safety.link_loss_timeout.value.is_zero() {
            return bad("safety.linkLossTimeout", "must be above zero".into());
        }
        if self.command_restart_max_delay.value < Duration::from_secs(1) {
            return bad("commandRestartMaxDelay", "must be at least 1s".into());
        }
        for (name, spec) in &self.paths {
            if let Err(e) = spec.validate() {
                return bad(&format!("paths.{name}"), e);
            }
        }
        let v = &self.video;
        if v.enabled && v.source.trim().is_empty() {
            return bad("video.source", "is empty".into());
        }
        if !(16..=7680).contains(&v.width) || !(16..=4320).contains(&v.height) {
            return bad("video.width", format!("{}x{} is not a usable size", v.width, v.height));
        }
        if !(1..=120).contains(&v.framerate) {
            return bad("video.framerate", format!("must be between 1 and 120, got {}", v.framerate));
        }
        if !(50..=50_000).contains(&v.bitrate_kbps) {
            return bad("video.bitrateKbps", format!("must be between 50 and 50000, got {}", v.bitrate_kbps));
        }
        if !(v.min_bitrate_kbps <= v.bitrate_kbps && v.bitrate_kbps <= v.max_bitrate_kbps) {
            return bad(
                "video.minBitrateKbps",
                format!(
                    "need minBitrateKbps <= bitrateKbps <= maxBitrateKbps, got {} <= {} <= {}",
                    v.min_bitrate_kbps, v.bitrate_kbps, v.max_bitrate_kbps
                ),
            );
        }
        if !(1..=3600).contains(&v.keyframe_interval) {
            return bad(
                "video.keyframeInterval",
                format!("must be between 1 and 3600 seconds, got {}", v.keyframe_interval),
            );
        }
        if !matches!(v.codec.as_str(), "auto" | "h264" | "vp8") {
            return bad("video.codec", format!("{:?} is not auto, h264 or vp8", v.codec));
        }
        let known = v.source == "testpattern"
            || v.source.starts_with("v4l2:")
            || v.source.starts_with("/dev/video")
            || v.source.starts_with("rtsp://")
            || v.source.starts_with("rtsps://")
            || v.source.starts_with("file:");
        if !known {
            return bad(
                "video.source",
                format!("{:?}: use testpattern, v4l2:/dev/videoN, rtsp://... or file:/path", v.source),
            );
        }
        for (i, s) in v.ice_servers.iter().enumerate() {
            if s.urls.is_empty()
                || s.urls.iter().any(|u| !["stun:", "turn:", "turns:"].iter().any(|p| u.starts_with(p)))
            {
                return bad(
                    &format!("video.iceServers[{i}].urls"),
                    "each URL starts with stun:, turn: or turns:".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_format_parses_and_keeps_unknown_keys() {
        let text = r#"
serverAddress: "ws://localhost:8000/ws"
handshakeKey: "group-default123"
clientID: "dev-1"
clientSecret: "abc"
logLevel: "info"
commandRestartMaxDelay: "5m"
paths:
  service-A:
    runOnInit: "/usr/bin/my-service"
    runOnInitRestart: "yes"
"#;
        let c = Config::parse(text, "config.yaml").unwrap();
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.telemetry, TelemetryConfig::default());
        assert!(c.paths["service-A"].run_on_init_restart);
        assert_eq!(c.command_restart_max_delay.value, Duration::from_secs(300));
        let back = serde_norway::to_string(&c).unwrap();
        assert!(back.contains("runOnInitRestart"));
    }

    #[test]
    fn save_is_atomic_and_keeps_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let text = "serverAddress: ws://x/ws\nhandshakeKey: hk\ncommandRestartMaxDelay: 5m\npaths:\n  svc:\n    runOnInit: /bin/true\n";
        std::fs::write(&path, text).unwrap();
        let mut c = Config::load(&path).unwrap();
        c.client_id = "boat-1".into();
        c.client_secret = "s".into();
        c.save(&path).unwrap();
        let back = Config::load(&path).unwrap();
        assert_eq!(back.client_id, "boat-1");
        assert_eq!(back.command_restart_max_delay.value, Duration::from_secs(300));
        assert!(back.paths.contains_key("svc"));
        assert!(
            std::fs::read_to_string(&path).unwrap().contains("commandRestartMaxDelay: 5m"),
            "written as it was read"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = Config::parse("serverAddress: ws://x/ws\nhandshakeKey: k\nreconnectInterval: 5\n", "c").unwrap();
        assert_eq!((c.reconnect_interval, c.max_reconnect_attempts, c.connection_timeout), (5.0, 0, 30.0));
        let env = |k: &str| match k {
            "RECONNECT_INTERVAL" => Some("0.5".to_owned()),
            "MAX_RECONNECT_ATTEMPTS" => Some("3".to_owned()),
            _ => None,
        };
        c.apply_env(env, "c").unwrap();
        assert_eq!((c.reconnect_interval, c.max_reconnect_attempts), (0.5, 3));
        let e = c.apply_env(|k| (k == "CONNECTION_TIMEOUT").then(|| "soon".to_owned()), "c").unwrap_err();
        assert!(e.to_string().contains("CONNECTION_TIMEOUT"), "{e}");
        let e = c.apply_env(|k| (k == "CONNECTION_TIMEOUT").then(|| "0".to_owned()), "c").unwrap_err();
        assert!(e.to_string().contains("connectionTimeout"), "{e}");
    }

    #[test]
    fn errors_say_where() {
        let e = Config::parse("serverAddress: http://x/ws\n", "c.yaml").unwrap_err();
        assert!(e.to_string().contains("serverAddress"), "{e}");
        let e = Config::parse("serverAddress: ws://x/ws\nclientID: a\n", "c.yaml").unwrap_err();
        assert!(e.to_string().contains("clientSecret"), "{e}");
        let e = Config::parse("serverAddress: [\n", "c.yaml").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn the_video_codec_is_auto_by_default_and_one_of_three() {
        let base = "serverAddress: ws://x/ws\nhandshakeKey: k\n";
        assert_eq!(Config::parse(base, "c").unwrap().video.codec, "auto");
        for codec in ["auto", "h264", "vp8"] {
            let c = Config::parse(&format!("{base}video:\n  codec: {codec}\n"), "c").unwrap();
            assert_eq!(c.video.codec, codec);
        }
        let e = Config::parse(&format!("{base}video:\n  codec: vp9\n"), "c").unwrap_err();
        assert!(e.to_string().contains("video.codec") && e.to_string().contains("auto, h264 or vp8"), "{e}");
    }
}
