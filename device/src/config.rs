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
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Simulated-boat and publishing settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryConfig {
    /// Frames per second from the built-in simulator (default 5).
    #[serde(default = "default_rate")]
    pub rate_hz: f64,
    /// Publish the built-in simulated boat's telemetry (default true).
    #[serde(default = "yes")]
    pub simulator: bool,
}

fn default_rate() -> f64 {
    5.0
}

fn yes() -> bool {
    true
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { rate_hz: default_rate(), simulator: true }
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
    /// Telemetry publishing.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Everything else in the file (paths, commandRestartMaxDelay, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_norway::Value>,
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
        let tmp = dir.join(format!(".{name}.tmp"));
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

    /// Applies the seed's environment settings over the file's values. `get` is the source
    /// of variables (the process environment in the binary, a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>, path: &str) -> Result<(), ConfigError> {
        let num = |name: &'static str| -> Result<Option<f64>, ConfigError> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| ConfigError::Invalid {
                    path: path.into(),
                    field: name,
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

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |field, message: String| Err(ConfigError::Invalid { path: path.into(), field, message });
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
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return bad("caFile", format!("{} is not a readable file", ca.display()));
            }
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
        if !(self.telemetry.rate_hz > 0.0 && self.telemetry.rate_hz <= 1000.0) {
            return bad("telemetry.rateHz", format!("must be between 0 and 1000, got {}", self.telemetry.rate_hz));
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
        assert!(c.extra.contains_key("paths"));
        assert!(c.extra.contains_key("commandRestartMaxDelay"));
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
        assert_eq!(back.extra["commandRestartMaxDelay"], serde_norway::Value::String("5m".into()));
        assert!(back.extra.contains_key("paths"));
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
}
