//! `execute_command`: run a program the config allows, with a timeout and an output cap,
//! streaming its output as `command_progress` chunks before the final `command_output`; and the
//! memory of recent correlation IDs that keeps a redelivered request from running twice.
//!
//! Rules (config `commands`):
//! - The program is started directly with its arguments; no shell is involved unless the request
//!   says `shell: true` **and** `allowShell` is on (then `sh -c <command>`, which the allow list
//!   cannot vet).
//! - `allow` names what may run: a bare name (`uptime`) allows that name as requested (looked up
//!   in `PATH`), never a path that merely ends in it; a path (`/usr/bin/df`) allows exactly that
//!   path; `"*"` allows anything.
//! - The timeout is the request's `timeoutMs`, else `timeout`; at most `maxTimeout`. On timeout
//!   the whole process group is killed and the output says `timedOut: true`.
//! - At most `maxOutputBytes` of each stream are kept and streamed; the rest is read and
//!   discarded (so the program never blocks on a full pipe) and `truncated` is set.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::time::{Duration, Instant};

use signaling::message::{CommandOutput, CommandProgress, ExecuteCommand};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::config::CommandsConfig;

/// Why a command was not started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not in the allow list, or a shell command while shells are off.
    #[error("{0}")]
    NotAllowed(String),
    /// The request itself is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Checks a request against the `commands` rules.
pub fn check(req: &ExecuteCommand, cfg: &CommandsConfig) -> Result<(), Refusal> {
    if req.command.trim().is_empty() {
        return Err(Refusal::Invalid("command is empty".into()));
    }
    if req.command.contains('\0') || req.args.iter().any(|a| a.contains('\0')) {
        return Err(Refusal::Invalid("command and arguments cannot contain NUL bytes".into()));
    }
    if req.shell {
        return if cfg.allow_shell {
            Ok(())
        } else {
            Err(Refusal::NotAllowed(
                "shell commands are not allowed on this device (commands.allowShell is off)".into(),
            ))
        };
    }
    let allowed = cfg.allow.iter().any(|entry| entry == "*" || entry == &req.command);
    if allowed {
        Ok(())
    } else if cfg.allow.is_empty() {
        Err(Refusal::NotAllowed(format!(
            "{:?} is not allowed: this device's commands.allow list is empty, so it runs no commands",
            req.command
        )))
    } else {
        Err(Refusal::NotAllowed(format!(
            "{:?} is not in this device's commands.allow list ({})",
            req.command,
            cfg.allow.join(", ")
        )))
    }
}

/// The timeout a request gets.
pub fn timeout_for(req: &ExecuteCommand, cfg: &CommandsConfig) -> Duration {
    req.timeout_ms.map(Duration::from_millis).unwrap_or(cfg.timeout.value).min(cfg.max_timeout.value)
}

/// Runs an allowed request to completion. Output chunks go to `progress` as they are read (a
/// full channel drops chunks rather than stalling the program; the final output still has
/// everything kept). Never fails: a program that cannot start yields exit code `None` and the
/// reason in `stderr`.
pub async fn run(req: &ExecuteCommand, cfg: &CommandsConfig, progress: mpsc::Sender<CommandProgress>) -> CommandOutput {
    let started = Instant::now();
    let timeout = timeout_for(req, cfg);
    let mut cmd = if req.shell {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(&req.command);
        c
    } else {
        let mut c = tokio::process::Command::new(&req.command);
        c.args(&req.args);
        c
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CommandOutput {
                stderr: format!("cannot start {:?}: {e}", req.command),
                duration_ms: started.elapsed().as_millis() as u64,
                ..CommandOutput::default()
            };
        }
    };
    let pid = child.id();
    let cap = cfg.max_output_bytes;
    let out = tokio::spawn(pump(child.stdout.take(), "stdout", cap, progress.clone()));
    let err = tokio::spawn(pump(child.stderr.take(), "stderr", cap, progress));
    // The program's exit is not enough: a child it left behind may hold the pipes open, so the
    // deadline covers reading them to the end as well.
    let deadline = tokio::time::Instant::now() + timeout;
    let status = tokio::time::timeout_at(deadline, child.wait()).await;
    let drained = async {
        let o = out.await.unwrap_or_else(|_| Collected::default());
        let e = err.await.unwrap_or_else(|_| Collected::default());
        (o, e)
    };
    tokio::pin!(drained);
    let (timed_out, exit_code, (stdout, stderr)) = match status {
        Ok(s) => match tokio::time::timeout_at(deadline, &mut drained).await {
            Ok(r) => (false, s.ok().and_then(|s| s.code()), r),
            Err(_) => {
                kill_group(pid);
                (true, None, drained.await)
            }
        },
        Err(_) => {
            kill_group(pid);
            let _ = child.wait().await;
            // The pipes close once the group is dead; collect what was read.
            (true, None, drained.await)
        }
    };
    CommandOutput {
        stdout: stdout.text,
        stderr: stderr.text,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        timed_out,
        truncated: stdout.truncated || stderr.truncated,
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // The child leads its own process group (see `process_group(0)`).
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

#[derive(Default)]
struct Collected {
    text: String,
    truncated: bool,
}

/// Reads a pipe to its end, keeping and streaming the first `cap` bytes.
async fn pump(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: &'static str,
    cap: usize,
    progress: mpsc::Sender<CommandProgress>,
) -> Collected {
    let mut kept: Vec<u8> = Vec::new();
    let mut truncated = false;
    let Some(mut pipe) = pipe else { return Collected { text: String::new(), truncated } };
    let mut buf = vec![0u8; 8192];
    // Bytes of `kept` already streamed.
    let mut sent = 0usize;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = cap.saturating_sub(kept.len());
        if n > room {
            truncated = true;
        }
        kept.extend_from_slice(&buf[..n.min(room)]);
        // Stream whole UTF-8 characters only.
        let upto = utf8_boundary(&kept, sent);
        if upto > sent {
            let chunk = CommandProgress {
                stream: stream.into(),
                data: String::from_utf8_lossy(&kept[sent..upto]).into_owned(),
                offset: sent as u64,
            };
            let _ = progress.try_send(chunk);
            sent = upto;
        }
    }
    if sent < kept.len() {
        let chunk = CommandProgress {
            stream: stream.into(),
            data: String::from_utf8_lossy(&kept[sent..]).into_owned(),
            offset: sent as u64,
        };
        let _ = progress.try_send(chunk);
    }
    Collected { text: String::from_utf8_lossy(&kept).into_owned(), truncated }
}

/// The end of the longest prefix of `bytes` that does not split a UTF-8 character, searching
/// from `from`.
fn utf8_boundary(bytes: &[u8], from: usize) -> usize {
    match std::str::from_utf8(&bytes[from..]) {
        Ok(_) => bytes.len(),
        // An incomplete character at the end waits for its remaining bytes; invalid bytes in
        // the middle are sent (and replaced) as they are.
        Err(e) if e.error_len().is_none() => from + e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

/// What the agent knows about a correlation ID it has seen.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Never seen (it is now remembered as running).
    New,
    /// Still running: the result will follow.
    Running,
    /// Finished; this was the final reply.
    Done(String),
}

/// The last N request correlation IDs and their final replies, so a redelivered request (the
/// relay's offline queue delivers again if the result was lost with the link) is answered again
/// instead of being run twice.
#[derive(Debug)]
pub struct Dedupe {
    capacity: usize,
    order: VecDeque<String>,
    entries: HashMap<String, Option<String>>,
}

impl Dedupe {
    /// Remembers up to `capacity` correlation IDs.
    pub fn new(capacity: usize) -> Self {
        Dedupe { capacity: capacity.max(1), order: VecDeque::new(), entries: HashMap::new() }
    }

    /// Records `id` as seen and says what was known about it before.
    pub fn begin(&mut self, id: &str) -> Seen {
        match self.entries.get(id) {
            Some(None) => return Seen::Running,
            Some(Some(reply)) => return Seen::Done(reply.clone()),
            None => {}
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        self.order.push_back(id.to_owned());
        self.entries.insert(id.to_owned(), None);
        Seen::New
    }

    /// Stores the final reply for `id`.
    pub fn finish(&mut self, id: &str, reply: &str) {
        if let Some(slot) = self.entries.get_mut(id) {
            *slot = Some(reply.to_owned());
        }
    }

    /// Changes how many are remembered.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(allow: &[&str]) -> CommandsConfig {
        CommandsConfig { allow: allow.iter().map(|s| s.to_string()).collect(), ..CommandsConfig::default() }
    }

    fn req(command: &str, args: &[&str]) -> ExecuteCommand {
        ExecuteCommand {
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..ExecuteCommand::default()
        }
    }

    #[test]
    fn the_allow_list_is_exact() {
        let c = cfg(&["echo", "/bin/ls"]);
        assert!(check(&req("echo", &["hi"]), &c).is_ok());
        assert!(check(&req("/bin/ls", &[]), &c).is_ok());
        // A path that merely ends in an allowed name is not allowed.
        assert!(matches!(check(&req("/tmp/x/echo", &[]), &c), Err(Refusal::NotAllowed(_))));
        assert!(matches!(check(&req("ls", &[]), &c), Err(Refusal::NotAllowed(_))));
        let e = check(&req("rm", &[]), &cfg(&[])).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        assert!(check(&req("anything", &[]), &cfg(&["*"])).is_ok());
        let mut shell = req("echo hi | wc -c", &[]);
        shell.shell = true;
        assert!(matches!(check(&shell, &cfg(&["*"])), Err(Refusal::NotAllowed(_))));
        assert!(check(&shell, &CommandsConfig { allow_shell: true, ..cfg(&[]) }).is_ok());
        assert!(matches!(check(&req(" ", &[]), &c), Err(Refusal::Invalid(_))));
    }

    #[tokio::test]
    async fn runs_streams_and_reports_the_exit_code() {
        let (tx, mut rx) = mpsc::channel(64);
        let out = run(&req("sh", &["-c", "echo out; echo err >&2; exit 3"]), &cfg(&["sh"]), tx).await;
        assert_eq!((out.stdout.as_str(), out.stderr.as_str(), out.exit_code), ("out\n", "err\n", Some(3)));
        assert!(!out.timed_out && !out.truncated);
        let mut chunks = Vec::new();
        while let Ok(c) = rx.try_recv() {
            chunks.push((c.stream, c.data));
        }
        assert!(chunks.contains(&("stdout".into(), "out\n".into())), "{chunks:?}");
        assert!(chunks.contains(&("stderr".into(), "err\n".into())), "{chunks:?}");
    }

    #[tokio::test]
    async fn the_timeout_kills_the_whole_group() {
        let (tx, _rx) = mpsc::channel(64);
        let mut r = req("sh", &["-c", "echo started; sleep 30 & sleep 30; echo never"]);
        r.timeout_ms = Some(300);
        let out = run(&r, &cfg(&["sh"]), tx).await;
        assert!(out.timed_out);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.stdout, "started\n");
        assert!(out.duration_ms < 20_000, "the background sleep did not keep it alive");
    }

    #[tokio::test]
    async fn output_beyond_the_cap_is_discarded() {
        let (tx, mut rx) = mpsc::channel(1024);
        let c = CommandsConfig { max_output_bytes: 1000, ..cfg(&["sh"]) };
        let out = run(&req("sh", &["-c", "head -c 100000 /dev/zero | tr '\\\\0' a; echo done >&2"]), &c, tx).await;
        assert!(out.truncated);
        assert_eq!(out.stdout.len(), 1000);
        assert_eq!(out.stderr, "done\n");
        assert_eq!(out.exit_code, Some(0));
        let mut streamed = 0;
        while let Ok(c) = rx.try_recv() {
            if c.stream == "stdout" {
                assert_eq!(c.offset as usize, streamed);
                streamed += c.data.len();
            }
        }
        assert_eq!(streamed, 1000);
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let (tx, _rx) = mpsc::channel(4);
        let out = run(&req("/nonexistent/prog", &[]), &cfg(&["*"]), tx).await;
        assert_eq!(out.exit_code, None);
        assert!(out.stderr.contains("cannot start"), "{}", out.stderr);
    }

    #[test]
    fn utf8_chunks_never_split_a_character() {
        let s = "héllo".as_bytes();
        assert_eq!(utf8_boundary(&s[..2], 0), 1);
        assert_eq!(utf8_boundary(s, 0), s.len());
    }

    #[test]
    fn dedupe_remembers_the_last_n() {
        let mut d = Dedupe::new(2);
        assert_eq!(d.begin("a"), Seen::New);
        assert_eq!(d.begin("a"), Seen::Running);
        d.finish("a", "reply-a");
        assert_eq!(d.begin("a"), Seen::Done("reply-a".into()));
        assert_eq!(d.begin("b"), Seen::New);
        assert_eq!(d.begin("c"), Seen::New);
        assert_eq!(d.begin("a"), Seen::New, "a was forgotten after two newer ones");
    }
}
