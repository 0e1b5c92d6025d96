//! Stable error codes. The string form is part of the protocol: clients match on it, so a
//! variant's wire name never changes once released.

use serde::{Deserialize, Serialize};

/// Why a request failed, as carried in `{"type":"error","payload":{"code":..,"message":..}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The text frame was not valid JSON.
    MalformedJson,
    /// The JSON had no `type`, or the `type` is not one this endpoint knows.
    UnknownType,
    /// The `type` is known but its payload is missing fields or has wrong types.
    InvalidPayload,
    /// A binary WebSocket frame arrived where JSON text is expected.
    BinaryNotSupported,
    /// The frame exceeds the relay's maximum message size; the connection is closed (1009).
    FrameTooLarge,
    /// A message other than `auth` arrived before authentication.
    NotAuthenticated,
    /// The credentials were missing, unknown or wrong.
    AuthFailed,
    /// The connection did not authenticate within the allowed time.
    AuthTimeout,
    /// The WebSocket ticket is unknown, already used or expired.
    InvalidTicket,
    /// `register` used a handshake key the relay does not accept.
    InvalidHandshakeKey,
    /// The target `clientID` does not exist (or is not visible to the sender).
    UnknownTarget,
    /// The target exists but is not connected.
    TargetOffline,
    /// The sender lacks the permission this message needs.
    Forbidden,
    /// The message is valid but not allowed from this kind of client (e.g. a pilot sending telemetry).
    NotAllowed,
    /// The sender exceeded a rate limit; `retryAfterMs` says when to try again.
    RateLimited,
    /// The connection's outbound control queue overflowed because the peer stopped reading.
    SlowConsumer,
    /// The relay is shutting down.
    ShuttingDown,
    /// A replacement connection for the same identity took over this one.
    Replaced,
    /// The target's offline queue is full; the message was not stored.
    QueueFull,
    /// A queued message expired before its target came online.
    Expired,
    /// A request's deadline passed without a result from the target.
    CommandTimeout,
    /// A control message came from someone who does not hold the device's control lease.
    NotController,
    /// The credential or session was revoked; the connection is closed.
    Revoked,
    /// The target cannot do this (e.g. no docker on the device).
    Unsupported,
    /// The device refused a program that its `commands.allow` list does not name (or a shell
    /// command while `commands.allowShell` is off).
    CommandNotAllowed,
    /// The device ran the program but it failed (e.g. docker answered an error).
    CommandFailed,
    /// A configuration update or reload was refused; the device keeps its last good config.
    InvalidConfig,
    /// No robot software is connected to the agent's local socket to take an app command, or
    /// it did not answer in time.
    RobotUnavailable,
    /// `process_command` named a process the device does not supervise (no such `paths` key).
    UnknownProcess,
    /// Something failed inside the relay; the message says what, the log has details.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order (for metrics and documentation).
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::MalformedJson,
        ErrorCode::UnknownType,
        ErrorCode::InvalidPayload,
        ErrorCode::BinaryNotSupported,
        ErrorCode::FrameTooLarge,
        ErrorCode::NotAuthenticated,
        ErrorCode::AuthFailed,
        ErrorCode::AuthTimeout,
        ErrorCode::InvalidTicket,
        ErrorCode::InvalidHandshakeKey,
        ErrorCode::UnknownTarget,
        ErrorCode::TargetOffline,
        ErrorCode::Forbidden,
        ErrorCode::NotAllowed,
        ErrorCode::RateLimited,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
        ErrorCode::Replaced,
        ErrorCode::QueueFull,
        ErrorCode::Expired,
        ErrorCode::CommandTimeout,
        ErrorCode::NotController,
        ErrorCode::Revoked,
        ErrorCode::Unsupported,
        ErrorCode::CommandNotAllowed,
        ErrorCode::CommandFailed,
        ErrorCode::InvalidConfig,
        ErrorCode::RobotUnavailable,
        ErrorCode::UnknownProcess,
        ErrorCode::Internal,
    ];

    /// The wire name, e.g. `"unknown_target"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::AuthTimeout => "auth_timeout",
            ErrorCode::InvalidTicket => "invalid_ticket",
            ErrorCode::InvalidHandshakeKey => "invalid_handshake_key",
            ErrorCode::UnknownTarget => "unknown_target",
            ErrorCode::TargetOffline => "target_offline",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Replaced => "replaced",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Expired => "expired",
            ErrorCode::CommandTimeout => "command_timeout",
            ErrorCode::NotController => "not_controller",
            ErrorCode::Revoked => "revoked",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::CommandNotAllowed => "command_not_allowed",
            ErrorCode::CommandFailed => "command_failed",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::RobotUnavailable => "robot_unavailable",
            ErrorCode::UnknownProcess => "unknown_process",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
