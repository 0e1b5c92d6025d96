//! Relay configuration: one typed struct. Each field's doc names its flag, environment variable
//! and default; the binary parses them with clap, tests build the struct directly (so no test
//! ever touches the process environment).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of a relay process.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Port for HTTP and WebSocket (`--port`, `PORT`, default 8000; 0 picks a free port).
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// Address to listen on (`--bind`, `BIND_ADDRESS`, default 0.0.0.0).
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Directory for the database and other state (`--data-dir`, `TETHER_DATA_DIR`, default `data`).
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
    /// SQLite database file (`--db`, `TETHER_DB`, default `<data-dir>/tether.db`).
    #[arg(long, env = "TETHER_DB", global = true)]
    pub db: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive
    /// (`--log-level`, `LOG_LEVEL`, default info; `DEBUG_MODE=true` means debug).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Seconds between WebSocket pings and clock-sync exchanges with devices
    /// (`--ping-interval`, `PING_INTERVAL`, default 20).
    #[arg(long, env = "PING_INTERVAL", default_value_t = 20.0)]
    pub ping_interval: f64,
    /// Seconds without any traffic from a peer before its connection is closed
    /// (`--connection-timeout`, `CONNECTION_TIMEOUT`, default 30).
    #[arg(long, env = "CONNECTION_TIMEOUT", default_value_t = 30.0)]
    pub connection_timeout: f64,
    /// Telemetry frames kept per device and replayed to new subscribers
    /// (`--telemetry-buffer-size`, `TELEMETRY_BUFFER_SIZE`, default 100).
    #[arg(long, env = "TELEMETRY_BUFFER_SIZE", default_value_t = 100)]
    pub telemetry_buffer_size: usize,
    /// Largest accepted WebSocket message in bytes; larger ones close the connection with 1009
    /// (`--max-message-size`, `MAX_MESSAGE_SIZE`, default 1048576).
    #[arg(long, env = "MAX_MESSAGE_SIZE", default_value_t = 1 << 20)]
    pub max_message_size: usize,
    /// Seconds a WebSocket ticket stays valid (`--ticket-ttl`, `TICKET_TTL`, default 30).
    #[arg(long, env = "TICKET_TTL", default_value_t = 30.0)]
    pub ticket_ttl: f64,
    /// Seconds a password login session (`POST /api/auth/login`) lasts, 60 to 2592000 (30 days);
    /// sessions older than this are refused, also ones made before it was shortened
    /// (`--session-ttl`, `SESSION_TTL`, default 43200 = 12 h).
    #[arg(long, env = "SESSION_TTL", default_value_t = DEFAULT_SESSION_TTL,
          value_parser = clap::value_parser!(u64).range(SESSION_TTL_RANGE))]
    pub session_ttl: u64,
    /// Seconds a new connection has to authenticate (`--auth-timeout`, `AUTH_TIMEOUT`, default 10).
    #[arg(long, env = "AUTH_TIMEOUT", default_value_t = 10.0)]
    pub auth_timeout: f64,
    /// Telemetry frames queued per connection before the oldest is dropped
    /// (`--telemetry-queue`, `TELEMETRY_QUEUE`, default 256).
    #[arg(long, env = "TELEMETRY_QUEUE", default_value_t = 256)]
    pub telemetry_queue: usize,
    /// Control messages queued per connection before it is closed as a slow consumer
    /// (`--control-queue`, `CONTROL_QUEUE`, default 1024).
    #[arg(long, env = "CONTROL_QUEUE", default_value_t = 1024)]
    pub control_queue: usize,
    /// Messages a connection may send per second (burst: twice that) before `rate_limited`
    /// (`--messages-per-second`, `MESSAGES_PER_SECOND`, default 200).
    #[arg(long, env = "MESSAGES_PER_SECOND", default_value_t = 200)]
    pub messages_per_second: u32,
    /// Bytes a connection may send per second (burst: twice that)
    /// (`--bytes-per-second`, `BYTES_PER_SECOND`, default 2097152).
    #[arg(long, env = "BYTES_PER_SECOND", default_value_t = 2 << 20)]
    pub bytes_per_second: u32,
    /// Connection attempts per minute per credential
    /// (`--connections-per-minute`, `CONNECTIONS_PER_MINUTE`, default 60).
    #[arg(long, env = "CONNECTIONS_PER_MINUTE", default_value_t = 60)]
    pub connections_per_minute: u32,
    /// Failed authentications per minute per IP address before it is refused for a while
    /// (`--auth-failures-per-minute`, `AUTH_FAILURES_PER_MINUTE`, default 20).
    #[arg(long, env = "AUTH_FAILURES_PER_MINUTE", default_value_t = 20)]
    pub auth_failures_per_minute: u32,
    /// Messages kept per offline device (`--queue-limit`, `QUEUE_LIMIT`, default 50).
    #[arg(long, env = "QUEUE_LIMIT", default_value_t = 50)]
    pub queue_limit: u32,
    /// Seconds a queued message waits for its device (`--queue-ttl`, `QUEUE_TTL`, default 86400).
    #[arg(long, env = "QUEUE_TTL", default_value_t = 86_400.0)]
    pub queue_ttl: f64,
    /// Seconds a command may wait for its result when it names no `timeoutMs`
    /// (`--command-timeout`, `COMMAND_TIMEOUT`, default 60).
    #[arg(long, env = "COMMAND_TIMEOUT", default_value_t = 60.0)]
    pub command_timeout: f64,
    /// Seconds a control lease lasts without a heartbeat (`--lease-timeout`, `LEASE_TIMEOUT`, default 10).
    #[arg(long, env = "LEASE_TIMEOUT", default_value_t = 10.0)]
    pub lease_timeout: f64,
    /// PEM certificate chain: with `--tls-key`, the relay serves HTTPS and WSS itself
    /// (`--tls-cert`, `TLS_CERT`, default: plain HTTP).
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert` (`--tls-key`, `TLS_KEY`).
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Admin API key to create on first start instead of a random one
    /// (`--admin-key`, `TETHER_ADMIN_KEY`, default: generate and print once).
    #[arg(long, env = "TETHER_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Video: modes, the SFU and its reachability.
    #[command(flatten)]
    pub media: MediaConfig,
    /// What the pilot console is told (`GET /api/console`).
    #[command(flatten)]
    pub console: ConsoleConfig,
}

/// Default of `--session-ttl`: 12 hours.
pub const DEFAULT_SESSION_TTL: u64 = 12 * 3600;
/// Allowed `--session-ttl`: a minute to 30 days.
pub const SESSION_TTL_RANGE: std::ops::RangeInclusive<u64> = 60..=30 * 86_400;
/// Allowed `--stale-video-ms`.
pub const STALE_VIDEO_RANGE: std::ops::RangeInclusive<u64> = 200..=60_000;

/// Settings the relay hands to the pilot console (`GET /api/console`, docs/api.md section 3),
/// and the map tile server the console's page may load images from (docs/operations.md).
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleConfig {
    /// Map tile URL template for the console's map, http(s) with `{z}`, `{x}` and `{y}`, e.g.
    /// `https://tile.openstreetmap.org/{z}/{x}/{y}.png`; its origin is added to the console
    /// page's `img-src` (`--map-tiles`, `TETHER_MAP_TILES`, default none: no map tiles).
    #[arg(long = "map-tiles", env = "TETHER_MAP_TILES", value_name = "URL", value_parser = parse_map_tiles)]
    pub map_tiles: Option<String>,
    /// Attribution shown under the map, e.g. `© OpenStreetMap contributors`
    /// (`--map-attribution`, `TETHER_MAP_ATTRIBUTION`).
    #[arg(long = "map-attribution", env = "TETHER_MAP_ATTRIBUTION", value_name = "TEXT")]
    pub map_attribution: Option<String>,
    /// Milliseconds without a new video frame before the console marks the video STALE,
    /// 200 to 60000 (`--stale-video-ms`, `STALE_VIDEO_MS`, default 2000).
    #[arg(long = "stale-video-ms", env = "STALE_VIDEO_MS", value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(STALE_VIDEO_RANGE))]
    pub stale_video_ms: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig { map_tiles: None, map_attribution: None, stale_video_ms: 2000 }
    }
}

/// Checks a map tile URL template; returns it unchanged.
pub fn parse_map_tiles(s: &str) -> Result<String, String> {
    tile_origin(s).map(|_| s.to_owned())
}

/// The origin of a tile URL template as a CSP source: `scheme://host[:port]`, with a leading
/// `{s}.` subdomain placeholder (Leaflet's) as `*.`. Errors say what is wrong.
pub fn tile_origin(template: &str) -> Result<String, String> {
    let fail = |why: &str| Err(format!("{template:?} is not a usable map tile URL: {why}"));
    let lower = template.to_ascii_lowercase();
    let scheme = if lower.starts_with("https://") {
        "https"
    } else if lower.starts_with("http://") {
        "http"
    } else {
        return fail("it must start with http:// or https://");
    };
    if template.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | ';' | ',')) {
        return fail("it may not contain spaces, quotes, commas or semicolons");
    }
    for p in ["{z}", "{x}", "{y}"] {
        if !template.contains(p) {
            return fail(&format!("it needs the placeholders {{z}}, {{x}} and {{y}} ({p} is missing)"));
        }
    }
    let rest = &template[scheme.len() + 3..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return fail("user names and passwords in the URL are not supported");
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = match authority.find(']') {
        Some(end) if authority.starts_with('[') => match &authority[end + 1..] {
            "" => (authority, None),
            tail => match tail.strip_prefix(':') {
                Some(p) => (&authority[..=end], Some(p)),
                None => return fail("the host name is missing or invalid"),
            },
        },
        _ => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let (host, wildcard) = match host.strip_prefix("{s}.") {
        Some(h) => (h, true),
        None => (host, false),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !v6.is_empty() && v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
    } else {
        !host.is_empty()
            && host.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    if !host_ok {
        return fail("the host name is missing or invalid");
    }
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return fail("the port is not a number from 1 to 65535");
    }
    let host = host.to_ascii_lowercase();
    let host = if wildcard { format!("*.{host}") } else { host };
    Ok(match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    })
}

/// Video sessions and the relay's SFU (docs/protocol.md 4.13, docs/operations.md).
#[derive(Debug, Clone, clap::Args)]
pub struct MediaConfig {
    /// Mode of video offers that name none: auto, p2p or sfu (`--video-mode`, `VIDEO_MODE`, default auto).
    #[arg(long = "video-mode", env = "VIDEO_MODE", default_value = "auto", value_parser = ["auto", "p2p", "sfu"])]
    pub default_mode: String,
    /// Turn the SFU off: video is peer to peer only (`--no-sfu`, `NO_SFU`).
    #[arg(long = "no-sfu", env = "NO_SFU")]
    pub no_sfu: bool,
    /// Seconds an `auto` session waits for its peer-to-peer path to connect before moving to
    /// the SFU (`--p2p-timeout`, `P2P_TIMEOUT`, default 5).
    #[arg(long = "p2p-timeout", env = "P2P_TIMEOUT", default_value_t = 5.0)]
    pub p2p_timeout: f64,
    /// `auto` sends a pilot straight to the SFU when more than this many pilots already watch
    /// the device (`--sfu-above-viewers`, `SFU_ABOVE_VIEWERS`, default 2).
    #[arg(long = "sfu-above-viewers", env = "SFU_ABOVE_VIEWERS", default_value_t = 2)]
    pub sfu_above_viewers: usize,
    /// Public addresses the SFU announces instead of its interfaces' (1:1 NAT, e.g. a cloud
    /// VM's elastic IP), comma-separated (`--public-ip`, `PUBLIC_IP`).
    #[arg(long = "public-ip", env = "PUBLIC_IP", value_delimiter = ',')]
    pub public_ips: Vec<String>,
    /// UDP port range of the SFU's media sockets, `LOW-HIGH`, e.g. 50000-50199 (`--rtc-ports`,
    /// `RTC_PORTS`, default: ephemeral ports). Each peer takes one port of the range.
    #[arg(long = "rtc-ports", env = "RTC_PORTS", value_parser = parse_port_range)]
    pub rtc_ports: Option<(u16, u16)>,
    /// Also offer ICE-TCP (passive) candidates, for viewers whose networks block UDP
    /// (`--ice-tcp`, `ICE_TCP`).
    #[arg(long = "ice-tcp", env = "ICE_TCP")]
    pub ice_tcp: bool,
    /// STUN/TURN servers for the SFU's own peers, comma-separated URLs (`--ice-server`,
    /// `ICE_SERVERS`; default none: the relay is the reachable party).
    #[arg(long = "ice-server", env = "ICE_SERVERS", value_delimiter = ',')]
    pub ice_servers: Vec<String>,
    /// TURN user name for `--ice-server` (`--ice-username`, `ICE_USERNAME`).
    #[arg(long = "ice-username", env = "ICE_USERNAME")]
    pub ice_username: Option<String>,
    /// TURN password for `--ice-server` (`--ice-credential`, `ICE_CREDENTIAL`).
    #[arg(long = "ice-credential", env = "ICE_CREDENTIAL", hide_env_values = true)]
    pub ice_credential: Option<String>,
    /// Also gather loopback candidates, for devices and viewers on the relay's own machine
    /// (`--rtc-loopback`, `RTC_LOOPBACK`; tests and demos).
    #[arg(long = "rtc-loopback", env = "RTC_LOOPBACK")]
    pub include_loopback: bool,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            default_mode: "auto".into(),
            no_sfu: false,
            p2p_timeout: 5.0,
            sfu_above_viewers: 2,
            public_ips: Vec::new(),
            rtc_ports: None,
            ice_tcp: false,
            ice_servers: Vec::new(),
            ice_username: None,
            ice_credential: None,
            include_loopback: false,
        }
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) =
        s.split_once('-').ok_or_else(|| format!("{s:?} is not a range: write LOW-HIGH, e.g. 50000-50199"))?;
    let lo: u16 = lo.trim().parse().map_err(|_| format!("{lo:?} is not a port number"))?;
    let hi: u16 = hi.trim().parse().map_err(|_| format!("{hi:?} is not a port number"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: the range must be LOW-HIGH with 0 < LOW <= HIGH"));
    }
    Ok((lo, hi))
}

impl MediaConfig {
    /// The SFU's settings.
    pub fn sfu_settings(&self) -> ::media::sfu::SfuSettings {
        let ice_servers = if self.ice_servers.is_empty() {
            Vec::new()
        } else {
            vec![::media::rtc::IceServer {
                urls: self.ice_servers.clone(),
                username: self.ice_username.clone(),
                credential: self.ice_credential.clone(),
            }]
        };
        ::media::sfu::SfuSettings {
            ice_servers,
            reach: ::media::rtc::Reachability {
                public_ips: self.public_ips.clone(),
                ports: self.rtc_ports,
                ice_tcp: self.ice_tcp,
            },
            include_loopback: self.include_loopback,
            ..::media::sfu::SfuSettings::default()
        }
    }

    /// How long `auto` waits for peer to peer.
    pub fn p2p_deadline(&self) -> Duration {
        secs(self.p2p_timeout)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            port: 8000,
            bind: IpAddr::from([0, 0, 0, 0]),
            data_dir: PathBuf::from("data"),
            db: None,
            log_level: "info".into(),
            ping_interval: 20.0,
            connection_timeout: 30.0,
            telemetry_buffer_size: 100,
            max_message_size: 1 << 20,
            ticket_ttl: 30.0,
            session_ttl: DEFAULT_SESSION_TTL,
            auth_timeout: 10.0,
            telemetry_queue: 256,
            control_queue: 1024,
            messages_per_second: 200,
            bytes_per_second: 2 << 20,
            connections_per_minute: 60,
            auth_failures_per_minute: 20,
            queue_limit: 50,
            queue_ttl: 86_400.0,
            command_timeout: 60.0,
            lease_timeout: 10.0,
            tls_cert: None,
            tls_key: None,
            admin_key: None,
            media: MediaConfig::default(),
            console: ConsoleConfig::default(),
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() && s > 0.0 { s } else { 0.001 })
}

impl RelayConfig {
    /// The database path.
    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| self.data_dir.join("tether.db"))
    }

    /// Ping / clock-sync period.
    pub fn ping_every(&self) -> Duration {
        secs(self.ping_interval)
    }

    /// Idle limit.
    pub fn idle_timeout(&self) -> Duration {
        secs(self.connection_timeout)
    }

    /// Ticket lifetime.
    pub fn ticket_lifetime(&self) -> Duration {
        secs(self.ticket_ttl)
    }

    /// Default deadline for a command's result.
    pub fn command_deadline(&self) -> Duration {
        secs(self.command_timeout)
    }

    /// Control lease lifetime without heartbeat.
    pub fn lease_lifetime(&self) -> Duration {
        secs(self.lease_timeout)
    }

    /// Authentication deadline.
    pub fn auth_deadline(&self) -> Duration {
        secs(self.auth_timeout)
    }

    /// Lifetime of a password login session.
    pub fn session_lifetime(&self) -> Duration {
        Duration::from_secs(self.session_ttl)
    }

    /// Checks what clap checks for the binary, for configurations built in code: the map tile
    /// template and the ranges of `session_ttl` and `stale_video_ms`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.console.map_tiles {
            tile_origin(t)?;
        }
        if !SESSION_TTL_RANGE.contains(&self.session_ttl) {
            return Err(format!("session_ttl {} is outside 60..=2592000 seconds", self.session_ttl));
        }
        if !STALE_VIDEO_RANGE.contains(&self.console.stale_video_ms) {
            return Err(format!("stale_video_ms {} is outside 200..=60000", self.console.stale_video_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::tile_origin;

    #[test]
    fn tile_origins() {
        let ok = |t: &str| tile_origin(t).unwrap();
        assert_eq!(ok("https://tile.openstreetmap.org/{z}/{x}/{y}.png"), "https://tile.openstreetmap.org");
        assert_eq!(ok("HTTP://Tiles.Example:8080/{z}/{x}/{y}.png?k=1"), "http://tiles.example:8080");
        assert_eq!(ok("https://{s}.tile.example.org/{z}/{x}/{y}.png"), "https://*.tile.example.org");
        assert_eq!(ok("http://[::1]:9000/t/{z}/{x}/{y}"), "http://[::1]:9000");
        assert_eq!(ok("http://127.0.0.1/{z}/{y}/{x}.png"), "http://127.0.0.1");
        for bad in [
            "ftp://tiles.example/{z}/{x}/{y}.png",
            "tiles.example/{z}/{x}/{y}.png",
            "https://tiles.example/{z}/{x}.png",
            "https:///{z}/{x}/{y}.png",
            "https://tiles.example:0/{z}/{x}/{y}.png",
            "https://tiles.example:http/{z}/{x}/{y}.png",
            "https://u:p@tiles.example/{z}/{x}/{y}.png",
            "https://evil.example; script-src *;/{z}/{x}/{y}",
            "https://tiles.example/{z}/{x}/{y}.png' 'unsafe-inline",
            "https://ti_les.example/{z}/{x}/{y}.png",
        ] {
            let e = tile_origin(bad).unwrap_err();
            assert!(e.contains("not a usable map tile URL"), "{bad}: {e}");
        }
    }
}
