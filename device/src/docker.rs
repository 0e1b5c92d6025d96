//! `docker_command` (seed 002): list, start, stop and restart containers through the `docker`
//! CLI. A device without docker answers `unsupported`; docker's own failures come back as
//! `command_failed` with docker's message.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use signaling::ErrorCode;
use signaling::message::DockerCommand;

/// How long one docker CLI call may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);

/// The `docker` executable in `PATH`, if there is one.
pub fn find_docker() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("docker")).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// A container name or id as docker accepts them; never something that looks like an option.
fn valid_container(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name.len() <= 128
}

/// Carries out the request: `Ok(data)` or `Err((code, message))`.
pub async fn run(req: &DockerCommand) -> Result<Value, (ErrorCode, String)> {
    let args: Vec<&str> = match (req.action.as_str(), req.container.as_deref()) {
        ("list", _) => vec!["ps", "--all", "--no-trunc", "--format", "{{json .}}"],
        ("start" | "stop" | "restart", Some(c)) if valid_container(c) => vec![req.action.as_str(), c],
        ("start" | "stop" | "restart", Some(c)) => {
            return Err((ErrorCode::InvalidPayload, format!("{c:?} is not a container name or id")));
        }
        ("start" | "stop" | "restart", None) => {
            return Err((ErrorCode::InvalidPayload, format!("docker {} needs \"container\"", req.action)));
        }
        (other, _) => {
            return Err((
                ErrorCode::InvalidPayload,
                format!("unknown docker action {other:?}; use list, start, stop or restart"),
            ));
        }
    };
    let Some(docker) = find_docker() else {
        return Err((ErrorCode::Unsupported, "docker is not installed on this device".into()));
    };
    let run = tokio::process::Command::new(&docker).args(&args).kill_on_drop(true).output();
    let out = match tokio::time::timeout(DOCKER_TIMEOUT, run).await {
        Err(_) => return Err((ErrorCode::CommandFailed, format!("docker {} did not finish in 60 s", args[0]))),
        Ok(Err(e)) => return Err((ErrorCode::CommandFailed, format!("cannot run {}: {e}", docker.display()))),
        Ok(Ok(o)) => o,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err((ErrorCode::CommandFailed, format!("docker {}: {}", args[0], err.trim())));
    }
    if req.action == "list" {
        let containers: Vec<Value> =
            stdout.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
        Ok(json!({"containers": containers}))
    } else {
        Ok(json!({"container": req.container, "action": req.action, "output": stdout.trim()}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_cannot_be_options() {
        assert!(valid_container("web-1"));
        assert!(valid_container("3f2a9c0d"));
        assert!(!valid_container("--privileged"));
        assert!(!valid_container(""));
        assert!(!valid_container("a b"));
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_docker_is_looked_for() {
        let r = run(&DockerCommand { action: "explode".into(), container: None }).await;
        assert_eq!(r.unwrap_err().0, ErrorCode::InvalidPayload);
        let r = run(&DockerCommand { action: "stop".into(), container: None }).await;
        assert_eq!(r.unwrap_err().0, ErrorCode::InvalidPayload);
    }
}
