//! What every `tether-bench` tool reads from `/proc` and needs to start the relay: CPU time,
//! memory, pinning, and the relay's listening address.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
pub fn clk_tck() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// utime + stime of a /proc stat line, in seconds; and the name in parentheses.
pub fn parse_stat(stat: &str) -> anyhow::Result<(String, f64)> {
    let (head, after) = stat.rsplit_once(')').context("bad /proc stat")?;
    let name = head.split_once('(').map(|(_, n)| n.to_owned()).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok((name, ticks / clk_tck()))
}

/// utime + stime of a process (all its threads, live and exited), seconds; `pid` may be `self`.
pub fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    Ok(parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?.1)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("bad /proc status line")?.parse()?)
}

/// Whether `taskset` (util-linux) is there to pin a server to its core.
pub fn have_taskset() -> bool {
    std::process::Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Reads a started relay's stdout until it says where it listens (within 30 s). Returns the
/// address and the rest of its stdout, which the caller must keep draining so the relay never
/// blocks on it. `log` is named in the error if the relay exits first.
pub async fn relay_listen_addr(
    child: &mut Child,
    log: &Path,
) -> anyhow::Result<(String, Lines<BufReader<ChildStdout>>)> {
    let mut lines = BufReader::new(child.stdout.take().context("relay stdout")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("tether-relay listening on http://") {
                return Ok::<_, anyhow::Error>(addr.to_owned());
            }
        }
        bail!("the relay exited without listening (see {})", log.display())
    })
    .await
    .context("the relay did not start within 30 s")??;
    Ok((addr, lines))
}
