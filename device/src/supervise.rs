//! Process supervision: the `paths` section of `config.yaml`.
//!
//! ```yaml
//! commandRestartMaxDelay: "5m"
//! paths:
//!   service-A:
//!     runOnInit: "/usr/bin/my-service --config /etc/my-service.conf"
//!     runOnInitRestart: "yes"   # yes/no/true/false, quoted or not; default no
//!     environment:
//!       - "ENV=production"
//! ```
//!
//! Each entry is a [`ProcessSpec`]; [`Supervisor::start`] runs them all and [`Supervisor::apply`]
//! moves a running set to a new one. Driving it:
//!
//! - create a bounded `tokio::sync::mpsc` channel and pass its sender to [`Supervisor::start`]
//!   (inside a tokio runtime); forward what arrives on the receiver ([`SupervisorEvent`]) to the
//!   relay as `process_state` and `log` messages;
//! - call [`Supervisor::apply`] after a config update, [`Supervisor::snapshot`] whenever a full
//!   picture is wanted (for instance right after the link comes up), [`Supervisor::control`]
//!   for an operator's `process_command`, and [`Supervisor::shutdown`] before the agent exits.
//!   Dropping a `Supervisor` without `shutdown` still stops every process, in the background.
//!
//! # Running a process
//!
//! `runOnInit` is split into words with shell quoting rules ([`shell_words::split`]) and run
//! directly, without a shell: write `sh -c '...'` for pipes or redirections. The process gets the
//! agent's environment plus the `environment` entries, `/dev/null` as stdin, piped stdout and
//! stderr, and a process group of its own (`process_group(0)`), so that stopping it reaches
//! everything it started. The process group is the unit of supervision: when the main process
//! exits, whatever it left running in its group is killed (SIGKILL), so a restart never runs
//! next to leftovers of the previous run. A run-once job that wants to leave a daemon behind must
//! detach it into its own session (`setsid`), as daemons do anyway.
//!
//! # States
//!
//! Every process is one [`ProcessInfo`] (see its field docs) whose `state` moves
//! `starting` → `running` (with `pid`) → `exited` (`lastExit` = `exit N` or `signal N`). With
//! `runOnInitRestart` it then goes to `restarting` (`restartAt` = device time of the next start)
//! and back to `starting`, with `restarts` incremented. A process that cannot be started (no such
//! file, not executable) goes to `failed` with the reason in `lastExit`, and with restart on is
//! retried with the same backoff as a crash. An entry whose definition is invalid (see
//! [`ProcessSpec::validate`]) is `failed` and never retried: retrying cannot fix it. A process
//! stopped by [`Supervisor::apply`] or [`Supervisor::shutdown`] ends `stopped`; a removed entry
//! is reported `stopped` once and then leaves the snapshot, which always has one entry per
//! `paths` entry. `since` is the device time of the last change.
//!
//! # Operator control
//!
//! [`Supervisor::control`] stops, starts or restarts one entry on request. A process stopped
//! this way ends `stopped` and stays stopped, whatever `runOnInitRestart` says, until it is
//! started or restarted the same way, its definition (`runOnInit`, `runOnInitRestart`,
//! `environment`) changes in an [`Supervisor::apply`], or the agent restarts (which starts every
//! entry): the stop lives in memory only, never in config.yaml. A start keeps the entry's
//! `restarts` and `lastExit` (they describe its history; `restarts` counts only the
//! supervisor's own restarts) and begins a fresh backoff.
//!
//! Every change produces a full snapshot ([`SupervisorEvent::State`]). Snapshots are never
//! dropped: they go through an internal queue to a task that delivers them with
//! `Sender::send().await`, in the order the changes happened, so a slow consumer delays
//! delivery but never blocks a process or loses a transition. The queue grows only while the
//! consumer stalls, and by at most a few snapshots per second per process (the restart backoff
//! bounds how often a process can change state).
//!
//! # Restart backoff
//!
//! The first restart waits 1 s, each consecutive crash doubles the wait, up to `max_delay`
//! (`commandRestartMaxDelay`, 5 min by default in the agent). A run that lasted at least
//! 30 s, or `max_delay` if that is smaller, counts as healthy and resets the wait to 1 s: with a
//! small cap the 30 s rule would otherwise keep a process that crashes every 20 s at the cap
//! forever, and a run longer than the longest wait we would ever impose is not a crash loop.
//! Waits are never shorter than 100 ms, whatever `max_delay` says, so a process that fails
//! instantly cannot make the agent spin.
//!
//! # Output
//!
//! Every line a process writes on stdout or stderr becomes a [`SupervisorEvent::Log`] (and a
//! `tracing` debug event): without its newline (`\n` or `\r\n`), decoded as UTF-8 with invalid
//! bytes replaced, and cut at 8 KiB with a `…` marker (the rest of that line is discarded, so a
//! process writing without newlines cannot make the agent buffer without limit). A last line
//! without newline is delivered when the stream ends. Log events are sent with `try_send`: when
//! the channel is full they are dropped and counted ([`Supervisor::dropped_log_lines`]), because
//! a process must never block on its own output because the link is slow.
//!
//! # Stopping
//!
//! Stopping a process sends SIGTERM to its process group, waits up to 5 s for the main process
//! to exit, then sends SIGKILL to the group. [`Supervisor::shutdown`] does this for every
//! process at once and returns when they are all gone.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use signaling::message::{LogLine, ProcessInfo, ProcessState};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The first restart delay, and the delay after a healthy run.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The shortest restart delay, whatever `max_delay` says: keeps an instantly failing process
/// from making the supervisor spin.
const MIN_DELAY: Duration = Duration::from_millis(100);
/// A run at least this long (or `max_delay`, if smaller) resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// Time between SIGTERM and SIGKILL when stopping a process.
const GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the output pipes to reach end-of-file once the process group is gone.
/// Only a process that left the group (setsid) can hold them longer; its output is abandoned.
const PIPE_DRAIN: Duration = Duration::from_secs(2);
/// How long stopping may take before the supervisor gives up on a process task: the grace
/// period, then SIGKILL, reaping and draining, which are quick unless the kernel is stuck.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Supervisor::shutdown`] waits for the final snapshots to be taken by the consumer.
/// The caller may be the consumer itself, so this cannot wait forever; undelivered snapshots are
/// still delivered in the background while the receiver exists.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Supervisor::control`] waits for a process it started to leave `starting`.
pub const START_WAIT: Duration = Duration::from_secs(10);
/// Longest log line, in bytes, before the `…` marker.
const MAX_LINE: usize = 8 * 1024;

/// One `paths` entry of `config.yaml`.
///
/// Unknown keys are kept in `extra`, so writing the config back loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// The command line, split with shell quoting rules and run without a shell (`runOnInit`;
    /// required, but a missing one reads as empty so that [`ProcessSpec::validate`] can say so).
    #[serde(default)]
    pub run_on_init: String,
    /// Restart the process whenever it exits or cannot be started (`runOnInitRestart`: `yes`,
    /// `no`, `true` or `false`; written back as `"yes"`/`"no"`; default no).
    #[serde(default, with = "yes_no")]
    pub run_on_init_restart: bool,
    /// `NAME=value` entries added to the agent's environment (`environment`, default none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment: Vec<String>,
    /// Every other key of the entry, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_norway::Value>,
}

impl ProcessSpec {
    /// Checks what can be checked without running anything: a non-empty command that splits into
    /// words, and `NAME=value` environment entries. The error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.argv().map(|_| ())?;
        for entry in &self.environment {
            if entry.contains('\0') {
                return Err(format!("environment entry {entry:?} contains a NUL byte"));
            }
            match entry.split_once('=') {
                None => return Err(format!("environment entry {entry:?} is not NAME=value (no '=')")),
                Some(("", _)) => return Err(format!("environment entry {entry:?} has an empty name")),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The program and its arguments.
    fn argv(&self) -> Result<Vec<String>, String> {
        if self.run_on_init.trim().is_empty() {
            return Err("runOnInit is empty".into());
        }
        if self.run_on_init.contains('\0') {
            return Err("runOnInit contains a NUL byte".into());
        }
        let words = shell_words::split(&self.run_on_init)
            .map_err(|e| format!("runOnInit {:?} cannot be split into words: {e}", self.run_on_init))?;
        match words.first() {
            Some(program) if !program.is_empty() => Ok(words),
            _ => Err(format!("runOnInit {:?} names no program", self.run_on_init)),
        }
    }

    /// Whether running `other` instead of `self` needs a restart: `extra` does not count, as
    /// the supervisor does not use it.
    fn same_definition(&self, other: &ProcessSpec) -> bool {
        self.run_on_init == other.run_on_init
            && self.run_on_init_restart == other.run_on_init_restart
            && self.environment == other.environment
    }
}

/// `runOnInitRestart`: reads a YAML bool or `yes`/`no`/`true`/`false` (any case), writes
/// `"yes"`/`"no"` as the seed's files do. An empty value (`runOnInitRestart:`) reads as no.
mod yes_no {
    use std::fmt;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if *value { "yes" } else { "no" })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        d.deserialize_any(YesNo)
    }

    struct YesNo;

    impl Visitor<'_> for YesNo {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("yes, no, true or false")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim().to_ascii_lowercase().as_str() {
                "yes" | "true" => Ok(true),
                "no" | "false" => Ok(false),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }

        fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
}

/// Parses a duration such as `5m`, `30s`, `1h`, `250ms`, `1h30m` or `1.5s`; a plain number is
/// seconds. Units: `ms`, `s`, `m`, `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration (expected e.g. 30s, 5m, 1h30m, 250ms)".into());
    }
    if let Ok(secs) = text.parse::<f64>() {
        if !text.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
            return Err(format!("invalid duration {s:?}: expected a non-negative number"));
        }
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}: out of range"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() {
            return Err(format!("invalid duration {s:?}: expected a number at {rest:?}"));
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("invalid duration {s:?}: {number} has no unit (use ms, s, m or h)")),
            other => return Err(format!("invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)")),
        };
        let value: f64 = number.parse().map_err(|_| format!("invalid duration {s:?}: {number:?} is not a number"))?;
        let part = Duration::try_from_secs_f64(value * scale)
            .map_err(|_| format!("invalid duration {s:?}: {number}{unit} is out of range"))?;
        total = total.checked_add(part).ok_or_else(|| format!("invalid duration {s:?}: out of range"))?;
        rest = after;
    }
    Ok(total)
}

/// What the supervisor reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SupervisorEvent {
    /// A full snapshot after a change (send as `process_state`).
    State(ProcessState),
    /// One line of output (send as `log`).
    Log(LogLine),
}

/// What [`Supervisor::control`] does to one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Start it unless it is running or about to (`starting`).
    Start,
    /// Stop it and keep it stopped (see the module docs for how long).
    Stop,
    /// Stop it if it runs, then start it.
    Restart,
}

impl ControlAction {
    /// Parses `start`, `stop` or `restart`.
    pub fn parse(s: &str) -> Option<ControlAction> {
        match s {
            "start" => Some(ControlAction::Start),
            "stop" => Some(ControlAction::Stop),
            "restart" => Some(ControlAction::Restart),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlAction::Start => "start",
            ControlAction::Stop => "stop",
            ControlAction::Restart => "restart",
        }
    }
}

/// Why [`Supervisor::control`] did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No `paths` entry has that name.
    #[error("no supervised process is named {name:?} (known: {})", known_list(.known))]
    UnknownProcess {
        /// The name asked for.
        name: String,
        /// Every entry's name, sorted.
        known: Vec<String>,
    },
    /// The supervisor is shutting down with the agent.
    #[error("the agent is shutting down")]
    ShutDown,
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() { "none: config.yaml has no paths entries".into() } else { known.join(", ") }
}

/// What [`Supervisor::control`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlOutcome {
    /// The process's state afterwards. After a start this is past `starting` (normally
    /// `running`, or `failed` if it could not be started) unless that took longer than
    /// [`START_WAIT`].
    pub info: ProcessInfo,
    /// False when there was nothing to do: a start of a running (or starting) process, a stop
    /// of one already stopped on request.
    pub changed: bool,
}

/// What [`Supervisor::apply`] did, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// New entries, started.
    pub started: Vec<String>,
    /// Entries whose definition changed, stopped and started again.
    pub restarted: Vec<String>,
    /// Entries no longer in the set, stopped and removed.
    pub stopped: Vec<String>,
    /// Entries left alone (a change to unknown keys only also lands here).
    pub unchanged: Vec<String>,
}

/// Runs the `paths` processes; see the module docs.
pub struct Supervisor {
    /// What the process tasks share with the supervisor.
    shared: Arc<Shared>,
    /// The running set. A tokio mutex: `apply` and `shutdown` hold it while processes stop, so
    /// that two of them never work on the same set at once.
    entries: tokio::sync::Mutex<Entries>,
    /// The task delivering snapshots, taken by `shutdown` to wait for it.
    publisher: Mutex<Option<JoinHandle<()>>>,
}

/// The running set.
struct Entries {
    /// One per `paths` entry.
    map: BTreeMap<String, Entry>,
    /// Set by `shutdown`; `apply` does nothing afterwards.
    shut_down: bool,
    /// Generation for the next task (see [`Slot::generation`]).
    next_generation: u64,
}

/// One supervised process as the supervisor holds it.
struct Entry {
    /// The definition it runs.
    spec: ProcessSpec,
    /// Which task owns the entry's slot.
    generation: u64,
    /// Set to true to stop it; dropping it stops it as well.
    stop: watch::Sender<bool>,
    /// Its task, awaited when it is stopped; None once an operator stopped it (nothing runs).
    task: Option<JoinHandle<()>>,
}

/// State shared between the supervisor and its tasks.
struct Shared {
    /// Where log lines go (with `try_send`) and snapshots go (through the publisher).
    events: mpsc::Sender<SupervisorEvent>,
    /// Every process's state, and the queue to the publisher (under the same lock, so snapshots
    /// are queued in the order the changes happened).
    table: Mutex<Table>,
    /// `commandRestartMaxDelay`, updated by `apply` and read at each restart.
    max_delay: Mutex<Duration>,
    /// Log lines dropped because the events channel was full.
    dropped_logs: AtomicU64,
    /// Bumped on every state change, so [`Supervisor::control`] can wait for a start to settle.
    changes: watch::Sender<u64>,
}

/// Every process's state.
struct Table {
    slots: BTreeMap<String, Slot>,
    /// To the publisher task. Unbounded: see the module docs for why it stays small.
    publish: mpsc::UnboundedSender<Publish>,
}

/// One process's state.
struct Slot {
    /// The task allowed to change it. A task that outlived its entry (it was given up on while
    /// stopping) must not overwrite the state of the entry's next definition.
    generation: u64,
    info: ProcessInfo,
}

/// What the publisher task receives.
enum Publish {
    State(ProcessState),
    /// Sent by `shutdown` after the last snapshot.
    Close,
}

impl Supervisor {
    /// Starts every spec now. Must be called inside a tokio runtime. `max_delay` caps the
    /// restart backoff (`commandRestartMaxDelay`; see the module docs).
    ///
    /// Snapshots are sent on `events` with `send().await` semantics (never dropped); log lines
    /// with `try_send` (dropped and counted when the channel is full).
    pub fn start(
        specs: BTreeMap<String, ProcessSpec>,
        max_delay: Duration,
        events: mpsc::Sender<SupervisorEvent>,
    ) -> Supervisor {
        let (publish, queue) = mpsc::unbounded_channel();
        let publisher = tokio::spawn(publish_states(queue, events.clone()));
        let shared = Arc::new(Shared {
            events,
            table: Mutex::new(Table { slots: BTreeMap::new(), publish }),
            max_delay: Mutex::new(max_delay),
            dropped_logs: AtomicU64::new(0),
            changes: watch::Sender::new(0),
        });
        let mut entries = Entries { map: BTreeMap::new(), shut_down: false, next_generation: 0 };
        launch(&shared, &mut entries, specs);
        Supervisor { shared, entries: tokio::sync::Mutex::new(entries), publisher: Mutex::new(Some(publisher)) }
    }

    /// Moves to a new set: entries whose definition (`runOnInit`, `runOnInitRestart`,
    /// `environment`) changed are stopped and started again, new ones are started, missing ones
    /// are stopped and removed, and the rest keep running untouched (same pid, same restart
    /// count). `max_delay` applies from the next restart of every process. Returns when the
    /// stopped processes are gone and the new ones are launched. After
    /// [`Supervisor::shutdown`] it does nothing and returns an empty report.
    pub async fn apply(&self, specs: BTreeMap<String, ProcessSpec>, max_delay: Duration) -> ApplyReport {
        let mut entries = self.entries.lock().await;
        let mut report = ApplyReport::default();
        if entries.shut_down {
            tracing::warn!("process set not applied: the supervisor is shut down");
            return report;
        }
        *lock(&self.shared.max_delay) = max_delay;

        let mut to_stop = Vec::new();
        let mut to_start = BTreeMap::new();
        let old_names: Vec<String> = entries.map.keys().cloned().collect();
        for name in old_names {
            if !specs.contains_key(&name)
                && let Some(entry) = entries.map.remove(&name)
            {
                to_stop.push((name.clone(), entry));
                report.stopped.push(name);
            }
        }
        for (name, spec) in specs {
            match entries.map.get_mut(&name) {
                Some(entry) if entry.spec.same_definition(&spec) => {
                    entry.spec = spec;
                    report.unchanged.push(name);
                }
                Some(_) => {
                    if let Some(entry) = entries.map.remove(&name) {
                        to_stop.push((name.clone(), entry));
                    }
                    report.restarted.push(name.clone());
                    to_start.insert(name, spec);
                }
                None => {
                    report.started.push(name.clone());
                    to_start.insert(name, spec);
                }
            }
        }

        stop_all(&self.shared, to_stop).await;
        if !report.stopped.is_empty() {
            let mut table = lock(&self.shared.table);
            for name in &report.stopped {
                table.slots.remove(name);
            }
            table.publish_snapshot();
        }
        launch(&self.shared, &mut entries, to_start);
        tracing::info!(
            started = ?report.started,
            restarted = ?report.restarted,
            stopped = ?report.stopped,
            unchanged = report.unchanged.len(),
            "process set applied"
        );
        report
    }

    /// Stops, starts or restarts the entry `name` for an operator (see the module docs for how
    /// long a stop lasts). Holds the running set meanwhile, as `apply` does, so the two never
    /// work on the same entry at once. A stop returns once the process is gone (up to the 5 s
    /// grace period and SIGKILL); a start once it left `starting` or [`START_WAIT`] passed.
    pub async fn control(&self, name: &str, action: ControlAction) -> Result<ControlOutcome, ControlError> {
        let mut entries = self.entries.lock().await;
        if entries.shut_down {
            return Err(ControlError::ShutDown);
        }
        let Some(entry) = entries.map.remove(name) else {
            return Err(ControlError::UnknownProcess {
                name: name.into(),
                known: entries.map.keys().cloned().collect(),
            });
        };
        let state = self.info(name).map(|p| p.state).unwrap_or_default();
        let active = entry.task.is_some() && matches!(state.as_str(), "starting" | "running");
        let (entry, changed) = match action {
            ControlAction::Stop if entry.task.is_none() => (entry, false),
            ControlAction::Start if active => (entry, false),
            ControlAction::Stop => (self.halt(name, entry).await, true),
            ControlAction::Start => {
                // Not running: whatever its task still waits for (a backoff, a stop) is
                // retired without reporting `stopped`, so the start reads as one change.
                let entry = if entry.task.is_some() {
                    let quiet = entries.next_generation;
                    entries.next_generation += 1;
                    if let Some(slot) = lock(&self.shared.table).slots.get_mut(name) {
                        slot.generation = quiet;
                    }
                    self.halt(name, entry).await
                } else {
                    entry
                };
                (self.relaunch(&mut entries, name, entry).await, true)
            }
            ControlAction::Restart => {
                let entry = if entry.task.is_some() { self.halt(name, entry).await } else { entry };
                (self.relaunch(&mut entries, name, entry).await, true)
            }
        };
        entries.map.insert(name.to_owned(), entry);
        let info = self.info(name).unwrap_or_default();
        tracing::info!(process = %name, action = action.as_str(), changed, state = %info.state, "process control");
        Ok(ControlOutcome { info, changed })
    }

    /// Stops the entry's task and waits for it; the entry stays, with nothing running.
    async fn halt(&self, name: &str, mut entry: Entry) -> Entry {
        let task = entry.task.take();
        let stop = std::mem::replace(&mut entry.stop, watch::Sender::new(true));
        let running = Entry { spec: entry.spec.clone(), generation: entry.generation, stop, task };
        stop_all(&self.shared, vec![(name.to_owned(), running)]).await;
        entry
    }

    /// Starts a stopped entry again under a new generation, keeping its slot's history
    /// (`restarts`, `lastExit`), and waits for it to leave `starting`.
    async fn relaunch(&self, entries: &mut Entries, name: &str, entry: Entry) -> Entry {
        let generation = entries.next_generation;
        entries.next_generation += 1;
        let mut changes = self.shared.changes.subscribe();
        {
            let mut table = lock(&self.shared.table);
            let slot = table.slots.entry(name.to_owned()).or_insert_with(|| Slot {
                generation,
                info: ProcessInfo { name: name.to_owned(), ..Default::default() },
            });
            slot.generation = generation;
            slot.info.state = "starting".into();
            slot.info.pid = None;
            slot.info.restart_at = None;
            slot.info.since = now_ms();
            table.publish_snapshot();
        }
        let (stop, stop_rx) = watch::channel(false);
        let run = Run {
            name: name.to_owned(),
            spec: entry.spec.clone(),
            generation,
            shared: self.shared.clone(),
            stop: stop_rx,
        };
        let task = tokio::spawn(run.supervise());
        let settled = async {
            while self.info(name).is_some_and(|p| p.state == "starting") {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(START_WAIT, settled).await.is_err() {
            tracing::warn!(process = %name, "still starting after {START_WAIT:?}");
        }
        Entry { spec: entry.spec, generation, stop, task: Some(task) }
    }

    /// One process's current state.
    fn info(&self, name: &str) -> Option<ProcessInfo> {
        lock(&self.shared.table).slots.get(name).map(|s| s.info.clone())
    }

    /// The current state of every process, sorted by name.
    pub fn snapshot(&self) -> ProcessState {
        lock(&self.shared.table).snapshot()
    }

    /// Log lines dropped so far because the events channel was full.
    pub fn dropped_log_lines(&self) -> u64 {
        self.shared.dropped_logs.load(Ordering::Relaxed)
    }

    /// Stops everything: SIGTERM to each process group, SIGKILL to those still running after
    /// 5 s, and waits for them. Every process ends `stopped`. Waits up to 2 s more for the
    /// final snapshots to be delivered (the caller may be the one reading them); any not yet
    /// taken are still delivered afterwards. Calling it again does nothing.
    pub async fn shutdown(&self) {
        let mut entries = self.entries.lock().await;
        if entries.shut_down {
            return;
        }
        entries.shut_down = true;
        let all: Vec<(String, Entry)> = std::mem::take(&mut entries.map).into_iter().collect();
        stop_all(&self.shared, all).await;
        let _ = lock(&self.shared.table).publish.send(Publish::Close);
        let publisher = lock(&self.publisher).take();
        if let Some(publisher) = publisher
            && tokio::time::timeout(FLUSH_TIMEOUT, publisher).await.is_err()
        {
            tracing::debug!("process snapshots not yet taken by the consumer; delivering them in the background");
        }
    }
}

/// Starts a task for each spec, with a `starting` slot, and publishes one snapshot.
fn launch(shared: &Arc<Shared>, entries: &mut Entries, specs: BTreeMap<String, ProcessSpec>) {
    if specs.is_empty() {
        return;
    }
    let mut table = lock(&shared.table);
    for (name, spec) in specs {
        let generation = entries.next_generation;
        entries.next_generation += 1;
        let info = ProcessInfo { name: name.clone(), state: "starting".into(), since: now_ms(), ..Default::default() };
        table.slots.insert(name.clone(), Slot { generation, info });
        let (stop, stop_rx) = watch::channel(false);
        let run = Run { name: name.clone(), spec: spec.clone(), generation, shared: shared.clone(), stop: stop_rx };
        let task = tokio::spawn(run.supervise());
        entries.map.insert(name, Entry { spec, generation, stop, task: Some(task) });
    }
    table.publish_snapshot();
}

/// Tells every entry to stop, then waits for each. A task that does not finish in
/// [`STOP_TIMEOUT`] is aborted (which SIGKILLs its main process through `kill_on_drop`) and its
/// slot marked `stopped` on its behalf.
async fn stop_all(shared: &Shared, entries: Vec<(String, Entry)>) {
    for (_, entry) in &entries {
        entry.stop.send_replace(true);
    }
    for (name, entry) in entries {
        // An entry an operator stopped has no task left to wait for.
        let Some(mut task) = entry.task else { continue };
        if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
            tracing::warn!(process = %name, "process did not stop in time; abandoning it");
            task.abort();
            let _ = task.await;
            shared.update(&name, entry.generation, |p, _| {
                p.state = "stopped".into();
                p.pid = None;
                p.restart_at = None;
            });
        }
    }
}

/// Delivers queued snapshots in order until `Close` or until nobody listens.
async fn publish_states(mut queue: mpsc::UnboundedReceiver<Publish>, events: mpsc::Sender<SupervisorEvent>) {
    while let Some(message) = queue.recv().await {
        match message {
            Publish::State(state) => {
                if events.send(SupervisorEvent::State(state)).await.is_err() {
                    break;
                }
            }
            Publish::Close => break,
        }
    }
}

impl Table {
    fn snapshot(&self) -> ProcessState {
        ProcessState { processes: self.slots.values().map(|s| s.info.clone()).collect() }
    }

    fn publish_snapshot(&self) {
        // Fails only once the publisher has ended (shut down, or nobody listens): nothing to do.
        let _ = self.publish.send(Publish::State(self.snapshot()));
    }
}

impl Shared {
    /// Changes one process's state (if `generation` still owns it) and publishes a snapshot.
    /// `change` gets the time that becomes `since`.
    fn update(&self, name: &str, generation: u64, change: impl FnOnce(&mut ProcessInfo, f64)) {
        let mut table = lock(&self.table);
        let Some(slot) = table.slots.get_mut(name) else { return };
        if slot.generation != generation {
            return;
        }
        let now = now_ms();
        change(&mut slot.info, now);
        slot.info.since = now;
        table.publish_snapshot();
        drop(table);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn max_delay(&self) -> Duration {
        *lock(&self.max_delay)
    }

    fn log(&self, process: &str, stream: &'static str, line: String) {
        tracing::debug!(process, stream, "{line}");
        let event =
            SupervisorEvent::Log(LogLine { process: process.into(), stream: stream.into(), line, timestamp: now_ms() });
        match self.events.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let before = self.dropped_logs.fetch_add(1, Ordering::Relaxed);
                if before.is_multiple_of(1000) {
                    tracing::warn!(process, dropped = before + 1, "events channel full; dropping process log lines");
                }
            }
        }
    }
}

/// The restart delay: sans-IO, fed with how long each run lasted.
#[derive(Debug)]
struct Backoff {
    /// The delay before the next start, unless the run that just ended was healthy.
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: FIRST_DELAY }
    }

    /// The delay before starting again after a run that lasted `ran`.
    fn after_run(&mut self, ran: Duration, max_delay: Duration) -> Duration {
        let max = max_delay.max(MIN_DELAY);
        if ran >= HEALTHY_RUN.min(max) {
            self.next = FIRST_DELAY;
        }
        let delay = self.next.clamp(MIN_DELAY, max);
        self.next = delay.saturating_mul(2).min(max);
        delay
    }
}

/// How a run ended.
enum RunEnd {
    /// The process exited or could not be started.
    Ended,
    /// It was stopped on request: `lastExit`.
    Stopped(String),
}

/// One process's task: runs it, restarts it, stops it.
struct Run {
    name: String,
    spec: ProcessSpec,
    generation: u64,
    shared: Arc<Shared>,
    /// Becomes true (or closes) when the process must stop.
    stop: watch::Receiver<bool>,
}

impl Run {
    async fn supervise(mut self) {
        let argv = match self.spec.validate().and_then(|()| self.spec.argv()) {
            Ok(argv) => argv,
            Err(why) => {
                tracing::warn!(process = %self.name, "not started: {why}");
                self.set_failed(format!("invalid definition: {why}"));
                self.wait_stop_then_mark().await;
                return;
            }
        };
        let mut backoff = Backoff::new();
        loop {
            let began = Instant::now();
            match self.run_once(&argv).await {
                RunEnd::Stopped(how) => {
                    self.set_stopped(Some(how));
                    return;
                }
                RunEnd::Ended if !self.spec.run_on_init_restart => {
                    self.wait_stop_then_mark().await;
                    return;
                }
                RunEnd::Ended => {}
            }
            let delay = backoff.after_run(began.elapsed(), self.shared.max_delay());
            tracing::info!(process = %self.name, "restarting in {delay:?}");
            self.shared.update(&self.name, self.generation, |p, now| {
                p.state = "restarting".into();
                p.pid = None;
                p.restart_at = Some(now + delay.as_millis() as f64);
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop_requested(&mut self.stop) => {
                    self.set_stopped(None);
                    return;
                }
            }
            self.shared.update(&self.name, self.generation, |p, _| {
                p.state = "starting".into();
                p.restart_at = None;
                p.restarts = p.restarts.saturating_add(1);
            });
        }
    }

    /// Starts the process once and follows it until it exits or is stopped. Sets `running`,
    /// then `exited` or `failed`; the caller sets what comes after.
    async fn run_once(&mut self, argv: &[String]) -> RunEnd {
        let Some((program, args)) = argv.split_first() else {
            // `ProcessSpec::argv` never returns an empty list; this only keeps indexing out.
            self.set_failed("runOnInit names no program".into());
            return RunEnd::Ended;
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for entry in &self.spec.environment {
            if let Some((key, value)) = entry.split_once('=') {
                command.env(key, value);
            }
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let why = format!("cannot start {program}: {e}");
                tracing::warn!(process = %self.name, "{why}");
                self.set_failed(why);
                return RunEnd::Ended;
            }
        };
        let pid = child.id();
        tracing::info!(process = %self.name, pid, "process started");
        self.shared.update(&self.name, self.generation, |p, _| {
            p.state = "running".into();
            p.pid = pid;
            p.restart_at = None;
        });
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(out, self.name.clone(), "stdout", self.shared.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(err, self.name.clone(), "stderr", self.shared.clone())));
        }

        let (status, stopped) = tokio::select! {
            status = child.wait() => (status, false),
            () = stop_requested(&mut self.stop) => (terminate(&mut child, pid).await, true),
        };
        // Whatever the main process left in its group goes with it (see the module docs). The
        // group id cannot name another group yet: the kernel does not reuse a pid while a group
        // with that id exists, and if the group is already empty this finds nobody.
        if let Some(pid) = pid {
            signal_group(pid, libc::SIGKILL);
        }
        drain(readers).await;

        let how = describe(&status);
        if stopped {
            tracing::info!(process = %self.name, "process stopped ({how})");
            return RunEnd::Stopped(how);
        }
        tracing::info!(process = %self.name, "process ended ({how})");
        self.shared.update(&self.name, self.generation, |p, _| {
            p.state = "exited".into();
            p.pid = None;
            p.last_exit = Some(how);
        });
        RunEnd::Ended
    }

    fn set_failed(&self, why: String) {
        self.shared.update(&self.name, self.generation, |p, _| {
            p.state = "failed".into();
            p.pid = None;
            p.last_exit = Some(why);
            p.restart_at = None;
        });
    }

    /// `stopped`, keeping the previous `lastExit` unless `how` replaces it.
    fn set_stopped(&self, how: Option<String>) {
        self.shared.update(&self.name, self.generation, |p, _| {
            p.state = "stopped".into();
            p.pid = None;
            p.restart_at = None;
            if how.is_some() {
                p.last_exit = how;
            }
        });
    }

    /// For an entry that will not run again: waits to be stopped, then reports `stopped`.
    async fn wait_stop_then_mark(&mut self) {
        stop_requested(&mut self.stop).await;
        self.set_stopped(None);
    }
}

/// Resolves when the supervisor asks the process to stop or is gone.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// SIGTERM to the group, then SIGKILL after [`GRACE`]; returns how the main process ended.
async fn terminate(child: &mut Child, pid: Option<u32>) -> io::Result<ExitStatus> {
    match pid {
        Some(pid) => signal_group(pid, libc::SIGTERM),
        None => {
            let _ = child.start_kill();
        }
    }
    if let Ok(status) = tokio::time::timeout(GRACE, child.wait()).await {
        return status;
    }
    tracing::warn!(pid, "process ignored SIGTERM for {GRACE:?}; sending SIGKILL");
    if let Some(pid) = pid {
        signal_group(pid, libc::SIGKILL);
    }
    let _ = child.start_kill();
    child.wait().await
}

/// Sends `signal` to the process group `pgid` (which the supervisor created with
/// `process_group(0)`, so its id is the main process's pid).
// `kill(2)` has no safe wrapper in std or tokio; the call passes no pointers.
#[allow(unsafe_code)]
fn signal_group(pgid: u32, signal: libc::c_int) {
    // 0 and 1 would make `-pgid` mean "our own group" or "every process we may signal".
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, "cannot signal process group: {e}");
        }
    }
}

/// Waits for the output readers to reach end-of-file (flushing partial lines), giving up on
/// them after [`PIPE_DRAIN`].
async fn drain(readers: Vec<JoinHandle<()>>) {
    let deadline = tokio::time::Instant::now() + PIPE_DRAIN;
    for mut reader in readers {
        if tokio::time::timeout_at(deadline, &mut reader).await.is_err() {
            tracing::debug!("output still open after the process group ended; no longer reading it");
            reader.abort();
            let _ = reader.await;
        }
    }
}

/// `exit N`, `signal N`, or why waiting failed.
fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => status.to_string(),
        },
        Err(e) => format!("cannot wait for the process: {e}"),
    }
}

/// Reads one output stream and turns it into log lines (see the module docs).
async fn pump(stream: impl AsyncRead + Unpin, process: String, name: &'static str, shared: Arc<Shared>) {
    let mut reader = BufReader::new(stream);
    let mut line = LineBuf::default();
    loop {
        let consumed = match reader.fill_buf().await {
            Ok([]) => break,
            Ok(bytes) => match bytes.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    line.push(&bytes[..end]);
                    shared.log(&process, name, line.take());
                    end + 1
                }
                None => {
                    line.push(bytes);
                    bytes.len()
                }
            },
            Err(e) => {
                tracing::debug!(process, stream = name, "cannot read output: {e}");
                break;
            }
        };
        reader.consume(consumed);
    }
    if !line.is_empty() {
        shared.log(&process, name, line.take());
    }
}

/// A line being collected, at most [`MAX_LINE`] bytes of it.
#[derive(Default)]
struct LineBuf {
    bytes: Vec<u8>,
    /// Bytes beyond [`MAX_LINE`] were discarded.
    cut: bool,
}

impl LineBuf {
    fn push(&mut self, bytes: &[u8]) {
        let room = MAX_LINE - self.bytes.len();
        if bytes.len() > room {
            self.bytes.extend_from_slice(&bytes[..room]);
            self.cut = true;
        } else {
            self.bytes.extend_from_slice(bytes);
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && !self.cut
    }

    /// The line as text, and a fresh buffer.
    fn take(&mut self) -> String {
        let mut bytes = std::mem::take(&mut self.bytes);
        let cut = std::mem::take(&mut self.cut);
        if cut {
            bytes.truncate(complete_utf8_len(&bytes));
        } else if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if cut {
            text.push('…');
        }
        text
    }
}

/// `bytes` without a UTF-8 sequence cut off at its end (so a cut line does not end in a
/// replacement character for a character that was only split, not invalid).
fn complete_utf8_len(bytes: &[u8]) -> usize {
    // The last lead byte within the last four bytes, and how long its sequence should be.
    for back in 1..=bytes.len().min(4) {
        let at = bytes.len() - back;
        let b = bytes[at];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte
        }
        let want = match b {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return bytes.len(), // invalid anyway; lossy decoding replaces it
        };
        return if back < want { at } else { bytes.len() };
    }
    bytes.len()
}

/// Device clock, ms since the Unix epoch.
fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as f64).unwrap_or(0.0)
}

/// Locks a mutex, ignoring poisoning: the data are plain values that a panicking holder cannot
/// leave half-changed in a way that matters more than stopping supervision would.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Collects what a supervisor reports.
    struct Recorder {
        rx: mpsc::Receiver<SupervisorEvent>,
        states: Vec<ProcessState>,
        logs: Vec<LogLine>,
    }

    impl Recorder {
        fn new(rx: mpsc::Receiver<SupervisorEvent>) -> Recorder {
            Recorder { rx, states: Vec::new(), logs: Vec::new() }
        }

        /// Receives events until `done` holds; fails after a generous deadline.
        async fn until(&mut self, what: &str, done: impl Fn(&Recorder) -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
            while !done(self) {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(SupervisorEvent::State(s))) => self.states.push(s),
                    Ok(Some(SupervisorEvent::Log(l))) => self.logs.push(l),
                    Ok(None) => panic!("events closed while waiting for {what}"),
                    Err(_) => panic!("timed out waiting for {what}; last state {:#?}", self.states.last()),
                }
            }
        }

        /// Takes whatever is already queued.
        fn drain(&mut self) {
            while let Ok(event) = self.rx.try_recv() {
                match event {
                    SupervisorEvent::State(s) => self.states.push(s),
                    SupervisorEvent::Log(l) => self.logs.push(l),
                }
            }
        }

        fn latest(&self, name: &str) -> Option<&ProcessInfo> {
            self.states.last().and_then(|s| s.processes.iter().find(|p| p.name == name))
        }

        fn is(&self, name: &str, state: &str) -> bool {
            self.latest(name).is_some_and(|p| p.state == state)
        }

        /// Every distinct state `name` went through, in order.
        fn history(&self, name: &str) -> Vec<ProcessInfo> {
            let mut out: Vec<ProcessInfo> = Vec::new();
            for s in &self.states {
                if let Some(p) = s.processes.iter().find(|p| p.name == name)
                    && out.last() != Some(p)
                {
                    out.push(p.clone());
                }
            }
            out
        }

        fn lines(&self, name: &str, stream: &str) -> Vec<String> {
            self.logs.iter().filter(|l| l.process == name && l.stream == stream).map(|l| l.line.clone()).collect()
        }
    }

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        format!("sh {}", path.display())
    }

    fn spec(command: &str, restart: bool) -> ProcessSpec {
        ProcessSpec { run_on_init: command.into(), run_on_init_restart: restart, ..Default::default() }
    }

    fn set(entries: &[(&str, ProcessSpec)]) -> BTreeMap<String, ProcessSpec> {
        entries.iter().map(|(n, s)| (n.to_string(), s.clone())).collect()
    }

    fn start(specs: BTreeMap<String, ProcessSpec>, max_delay: Duration) -> (Supervisor, Recorder) {
        let (tx, rx) = mpsc::channel(4096);
        (Supervisor::start(specs, max_delay, tx), Recorder::new(rx))
    }

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[tokio::test]
    async fn long_running_process_reaches_running_with_a_pid() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "long.sh", "echo up\nsleep 1000\n");
        let (sup, mut rec) = start(set(&[("long", spec(&cmd, true))]), FIVE_MIN);
        rec.until("running", |r| r.is("long", "running")).await;
        let history = rec.history("long");
        assert_eq!(history[0].state, "starting");
        let pid = rec.latest("long").unwrap().pid.expect("a pid while running");
        assert!(alive(pid));
        assert_eq!(sup.snapshot().processes[0].pid, Some(pid));

        sup.shutdown().await;
        rec.until("stopped", |r| r.is("long", "stopped")).await;
        let last = rec.latest("long").unwrap();
        assert_eq!(last.pid, None);
        assert_eq!(last.last_exit.as_deref(), Some("signal 15"));
        assert_eq!(last.restarts, 0);
        assert!(!alive(pid), "the process is gone after shutdown");
        assert_eq!(sup.snapshot().processes[0].state, "stopped");
    }

    #[tokio::test]
    async fn crashing_process_is_restarted_with_growing_delay_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "crash.sh", "echo crashing\nexit 3\n");
        let cap = Duration::from_secs(2);
        let (sup, mut rec) = start(set(&[("crash", spec(&cmd, true))]), cap);
        rec.until("the fourth restart to be scheduled", |r| {
            r.latest("crash").is_some_and(|p| p.state == "restarting" && p.restarts == 3)
        })
        .await;
        sup.shutdown().await;

        let history = rec.history("crash");
        // (delay, scheduled at) of each restart: restartAt is relative to the same clock reading
        // as `since`, the moment the exit was noticed.
        let mut delays = Vec::new();
        for (i, p) in history.iter().enumerate() {
            if p.state != "restarting" {
                continue;
            }
            assert_eq!(history[i - 1].state, "exited");
            assert_eq!(history[i - 1].last_exit.as_deref(), Some("exit 3"));
            let at = p.restart_at.expect("restartAt while restarting");
            delays.push(at - p.since);
            // The next start does not come before it was due (small slack for clock rounding).
            if let Some(next) = history.get(i + 1) {
                assert_eq!(next.state, "starting");
                assert_eq!(next.restarts, p.restarts + 1);
                assert!(next.since + 50.0 >= at, "started at {} before due at {at}", next.since);
            }
        }
        assert_eq!(delays.len(), 4, "{history:#?}");
        let cap_ms = cap.as_millis() as f64;
        assert!(delays[0] > 0.0);
        assert!(delays[1] > delays[0], "second delay {} not greater than first {}", delays[1], delays[0]);
        assert!(delays.iter().all(|d| *d <= cap_ms), "cap exceeded: {delays:?}");
        assert!(delays[2] >= delays[1] && delays[3] >= delays[1], "{delays:?}");
        assert_eq!(delays[3], cap_ms);
        // Each run was running with a pid before it exited.
        assert!(history.iter().filter(|p| p.state == "running").all(|p| p.pid.is_some()));
        assert_eq!(history.iter().filter(|p| p.state == "running").count(), 4);
    }

    #[tokio::test]
    async fn restart_no_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let cmd = script(dir.path(), "once.sh", &format!("echo ran >> {}\nexit 1\n", count.display()));
        let (sup, mut rec) = start(set(&[("once", spec(&cmd, false))]), Duration::from_secs(1));
        rec.until("exited", |r| r.is("once", "exited")).await;
        // Longer than any restart delay would be.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        rec.drain();
        let last = rec.latest("once").unwrap();
        assert_eq!(last.state, "exited");
        assert_eq!(last.last_exit.as_deref(), Some("exit 1"));
        assert_eq!(last.restarts, 0);
        assert!(rec.history("once").iter().all(|p| p.state != "restarting"));
        assert_eq!(std::fs::read_to_string(&count).unwrap(), "ran\n");

        sup.shutdown().await;
        let last = sup.snapshot().processes[0].clone();
        assert_eq!(last.state, "stopped");
        assert_eq!(last.last_exit.as_deref(), Some("exit 1"), "the last run's end is kept");
    }

    #[tokio::test]
    async fn missing_binary_fails_and_is_retried_only_with_restart() {
        let missing = "/nonexistent/tether-test-no-such-binary --flag";
        let specs = set(&[("once", spec(missing, false)), ("retry", spec(missing, true))]);
        let (sup, mut rec) = start(specs, Duration::from_secs(1));
        rec.until("a retry that failed again", |r| {
            r.is("once", "failed") && r.latest("retry").is_some_and(|p| p.state == "failed" && p.restarts >= 1)
        })
        .await;
        let once = rec.latest("once").unwrap();
        let why = once.last_exit.as_deref().unwrap();
        assert!(why.contains("cannot start /nonexistent/tether-test-no-such-binary"), "{why}");
        assert!(why.contains("No such file"), "{why}");
        assert_eq!(once.pid, None);
        assert_eq!(once.restarts, 0);
        assert!(rec.history("once").iter().all(|p| p.state != "restarting"));

        let retry: Vec<String> = rec.history("retry").iter().map(|p| p.state.clone()).collect();
        assert_eq!(retry[..5], ["starting", "failed", "restarting", "starting", "failed"]);
        sup.shutdown().await;
        assert!(sup.snapshot().processes.iter().all(|p| p.state == "stopped"));
    }

    #[tokio::test]
    async fn invalid_definition_fails_without_retrying() {
        let (sup, mut rec) = start(set(&[("bad", spec("prog 'unclosed", true))]), Duration::from_secs(1));
        rec.until("failed", |r| r.is("bad", "failed")).await;
        let why = rec.latest("bad").unwrap().last_exit.clone().unwrap();
        assert!(why.starts_with("invalid definition: "), "{why}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rec.drain();
        assert!(rec.is("bad", "failed"));
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn log_lines_arrive_for_both_streams_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let body = "echo out1\necho err1 >&2\necho out2\necho err2 >&2\necho\nprintf 'crlf\\r\\n'\n\
                    printf 'caf\\303\\251 \\377bad\\n'\nhead -c 10000 /dev/zero | tr '\\000' x\necho\n\
                    echo \"$GREETING\" >&2\nprintf 'partial'\n";
        let cmd = script(dir.path(), "talk.sh", body);
        let mut s = spec(&cmd, false);
        s.environment = vec!["GREETING=hello=world".into()];
        let (sup, mut rec) = start(set(&[("talk", s)]), FIVE_MIN);
        rec.until("all output", |r| {
            r.is("talk", "exited") && r.lines("talk", "stdout").len() == 7 && r.lines("talk", "stderr").len() == 3
        })
        .await;
        let long = format!("{}…", "x".repeat(MAX_LINE));
        assert_eq!(
            rec.lines("talk", "stdout"),
            ["out1", "out2", "", "crlf", "café \u{fffd}bad", long.as_str(), "partial"]
        );
        assert_eq!(rec.lines("talk", "stderr"), ["err1", "err2", "hello=world"]);
        assert!(rec.logs.iter().all(|l| l.timestamp > 0.0));
        assert_eq!(sup.dropped_log_lines(), 0);
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn log_lines_are_dropped_not_blocking_when_the_channel_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "chatty.sh", "i=0\nwhile [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done\n");
        let (tx, mut rx) = mpsc::channel(4);
        let sup = Supervisor::start(set(&[("chatty", spec(&cmd, false))]), FIVE_MIN, tx);
        // Nobody reads for a while: the process must still run to its end.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sup.snapshot().processes[0].state != "exited" {
            assert!(tokio::time::Instant::now() < deadline, "process blocked by its output");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(sup.dropped_log_lines() > 0);
        // Snapshots are not dropped: they all arrive, ending with `exited`.
        let mut last = None;
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            if let SupervisorEvent::State(s) = event {
                last = Some(s);
            }
        }
        assert_eq!(last.unwrap().processes[0].state, "exited");
        sup.shutdown().await;
    }

    #[tokio::test]
    async fn apply_restarts_only_changed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "sleep.sh", "echo \"$1\"\nsleep 1000\n");
        let a = spec(&format!("{cmd} a"), true);
        let b = spec(&format!("{cmd} b"), true);
        let (sup, mut rec) = start(set(&[("a", a.clone()), ("b", b.clone())]), FIVE_MIN);
        rec.until("both running", |r| r.is("a", "running") && r.is("b", "running")).await;
        let pid_a = rec.latest("a").unwrap().pid.unwrap();
        let pid_b = rec.latest("b").unwrap().pid.unwrap();

        // `a` only gains an unknown key; `b`'s command changes; `c` is new.
        let mut a2 = a.clone();
        a2.extra.insert("note".into(), serde_norway::Value::String("kept".into()));
        let b2 = spec(&format!("{cmd} b2"), true);
        let c = spec(&format!("{cmd} c"), false);
        let report = sup.apply(set(&[("a", a2.clone()), ("b", b2), ("c", c.clone())]), FIVE_MIN).await;
        assert_eq!(
            report,
            ApplyReport {
                started: vec!["c".into()],
                restarted: vec!["b".into()],
                stopped: vec![],
                unchanged: vec!["a".into()],
            }
        );
        rec.until("b and c running", |r| {
            r.is("b", "running") && r.is("c", "running") && r.latest("b").unwrap().pid != Some(pid_b)
        })
        .await;
        assert_eq!(rec.latest("a").unwrap().pid, Some(pid_a), "unchanged entry keeps its process");
        assert!(rec.history("a").iter().all(|p| p.state != "stopped"));
        assert!(rec.history("b").iter().any(|p| p.state == "stopped"), "b was stopped before restarting");
        assert!(!alive(pid_b), "b's old process is gone");
        assert_eq!(rec.latest("b").unwrap().restarts, 0);
        let pid_b2 = rec.latest("b").unwrap().pid.unwrap();
        let pid_c = rec.latest("c").unwrap().pid.unwrap();

        let report = sup.apply(set(&[("a", a2)]), FIVE_MIN).await;
        assert_eq!(report.stopped, ["b", "c"]);
        assert_eq!(report.unchanged, ["a"]);
        assert!(report.started.is_empty() && report.restarted.is_empty());
        rec.until("b and c removed", |r| r.latest("b").is_none() && r.latest("c").is_none()).await;
        assert!(rec.history("c").last().is_some_and(|p| p.state == "stopped"), "reported stopped before leaving");
        assert!(!alive(pid_b2) && !alive(pid_c));
        let names: Vec<String> = sup.snapshot().processes.into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(sup.snapshot().processes[0].pid, Some(pid_a));

        sup.shutdown().await;
        assert!(!alive(pid_a));
        assert_eq!(sup.apply(set(&[("c", c)]), FIVE_MIN).await, ApplyReport::default(), "nothing after shutdown");
    }

    #[tokio::test]
    async fn control_stops_until_started_and_restarts_with_a_new_pid() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "sleep.sh", "sleep 1000\n");
        let once = script(dir.path(), "once.sh", "exit 4\n");
        let specs = set(&[("svc", spec(&cmd, true)), ("once", spec(&once, false))]);
        let (sup, mut rec) = start(specs.clone(), FIVE_MIN);
        rec.until("running", |r| r.is("svc", "running") && r.is("once", "exited")).await;
        let pid = rec.latest("svc").unwrap().pid.unwrap();

        // A stop sticks, although runOnInitRestart is on.
        let done = sup.control("svc", ControlAction::Stop).await.unwrap();
        assert!(done.changed);
        assert_eq!((done.info.state.as_str(), done.info.pid), ("stopped", None));
        assert!(!alive(pid));
        let again = sup.control("svc", ControlAction::Stop).await.unwrap();
        assert!(!again.changed, "stopping a stopped process changes nothing");
        // An unrelated config change leaves it stopped; so does one to its unknown keys only.
        let mut kept = specs.clone();
        kept.get_mut("svc").unwrap().extra.insert("note".into(), serde_norway::Value::String("x".into()));
        assert_eq!(sup.apply(kept, FIVE_MIN).await.unchanged, ["once", "svc"]);
        assert_eq!(sup.snapshot().processes[1].state, "stopped");

        let started = sup.control("svc", ControlAction::Start).await.unwrap();
        assert!(started.changed);
        assert_eq!(started.info.state, "running", "a start answers once the process runs");
        let pid2 = started.info.pid.unwrap();
        assert_ne!(pid2, pid);
        let noop = sup.control("svc", ControlAction::Start).await.unwrap();
        assert!(!noop.changed, "starting a running process changes nothing");
        assert_eq!(noop.info.pid, Some(pid2));

        let restarted = sup.control("svc", ControlAction::Restart).await.unwrap();
        let pid3 = restarted.info.pid.unwrap();
        assert!(restarted.changed && pid3 != pid2 && !alive(pid2));
        assert_eq!(restarted.info.last_exit.as_deref(), Some("signal 15"));
        assert_eq!(restarted.info.restarts, 0, "restarts counts only the supervisor's own");
        rec.until("restart seen", |r| r.latest("svc").is_some_and(|p| p.pid == Some(pid3))).await;
        let states: Vec<String> = rec.history("svc").into_iter().map(|p| p.state).collect();
        assert!(states.ends_with(&["stopped".into(), "starting".into(), "running".into()]), "{states:?}");

        // A run-once process that exited starts again: straight to starting, no `stopped`.
        let before = rec.history("once").len();
        let ran = sup.control("once", ControlAction::Start).await.unwrap();
        assert!(ran.changed);
        rec.until("once ran again", |r| r.history("once").len() > before && r.is("once", "exited")).await;
        let again: Vec<String> = rec.history("once")[before..].iter().map(|p| p.state.clone()).collect();
        assert!(!again.contains(&"stopped".into()), "{again:?}");

        let err = sup.control("nope", ControlAction::Stop).await.unwrap_err();
        assert_eq!(err, ControlError::UnknownProcess { name: "nope".into(), known: vec!["once".into(), "svc".into()] });
        assert!(err.to_string().contains("once, svc"), "{err}");

        // A definition change starts a stopped process again.
        sup.control("svc", ControlAction::Stop).await.unwrap();
        let mut changed = specs;
        changed.insert("svc".into(), spec(&format!("{cmd} x"), true));
        assert_eq!(sup.apply(changed, FIVE_MIN).await.restarted, ["svc"]);
        rec.until("running after the change", |r| r.is("svc", "running")).await;

        sup.shutdown().await;
        assert_eq!(sup.control("svc", ControlAction::Start).await.unwrap_err(), ControlError::ShutDown);
    }

    #[tokio::test]
    async fn shutdown_kills_a_process_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script(dir.path(), "stubborn.sh", "trap '' TERM\necho ready\nwhile :; do sleep 1; done\n");
        let (sup, mut rec) = start(set(&[("stubborn", spec(&cmd, true))]), FIVE_MIN);
        // Once it printed, the trap is in place.
        rec.until("ready", |r| r.is("stubborn", "running") && r.lines("stubborn", "stdout") == ["ready"]).await;
        let pid = rec.latest("stubborn").unwrap().pid.unwrap();
        sup.shutdown().await;
        let last = sup.snapshot().processes[0].clone();
        assert_eq!(last.state, "stopped");
        assert_eq!(last.last_exit.as_deref(), Some("signal 9"));
        assert!(!alive(pid));
        rec.until("stopped reported", |r| r.is("stubborn", "stopped")).await;
    }

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_healthy_run() {
        let mut b = Backoff::new();
        let crash = Duration::from_millis(10);
        let max = Duration::from_secs(10);
        let delays: Vec<u64> = (0..6).map(|_| b.after_run(crash, max).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.after_run(Duration::from_secs(10), max), Duration::from_secs(1), "run >= max_delay is healthy");
        assert_eq!(b.after_run(crash, max), Duration::from_secs(2));

        let mut b = Backoff::new();
        let max = FIVE_MIN;
        for _ in 0..20 {
            b.after_run(crash, max);
        }
        assert_eq!(b.after_run(Duration::from_secs(29), max), max, "29 s is not healthy");
        assert_eq!(b.after_run(Duration::from_secs(30), max), Duration::from_secs(1));

        let mut b = Backoff::new();
        assert_eq!(b.after_run(crash, Duration::ZERO), MIN_DELAY, "never busy-loops");
        let mut b = Backoff::new();
        assert_eq!(b.after_run(crash, Duration::from_millis(500)), Duration::from_millis(500), "cap below 1 s");
    }

    #[test]
    fn parse_duration_cases() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1m30s500ms"), Duration::from_millis(90_500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("45"), Duration::from_secs(45));
        assert_eq!(ok("0.25"), Duration::from_millis(250));
        assert_eq!(ok(" 10s "), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);

        let err = |s: &str| parse_duration(s).unwrap_err();
        assert!(err("").contains("empty"));
        assert!(err("   ").contains("empty"));
        assert!(err("5x").contains("unknown unit \"x\""), "{}", err("5x"));
        assert!(err("1h30").contains("30 has no unit"), "{}", err("1h30"));
        assert!(err("-5s").contains("expected a number"), "{}", err("-5s"));
        assert!(err("-5").contains("non-negative"), "{}", err("-5"));
        assert!(err("m").contains("expected a number"));
        assert!(err("1..5s").contains("not a number"));
        assert!(err("soon").contains("invalid duration \"soon\""));
        assert!(err("99999999999999999999999h").contains("out of range"));
    }

    #[test]
    fn validate_cases() {
        assert_eq!(spec("/usr/bin/my-service --config '/etc/my service.conf'", true).validate(), Ok(()));
        assert!(spec("", false).validate().unwrap_err().contains("runOnInit is empty"));
        assert!(spec("  ", false).validate().unwrap_err().contains("runOnInit is empty"));
        let e = spec("prog 'unclosed", false).validate().unwrap_err();
        assert!(e.contains("cannot be split into words"), "{e}");
        assert!(spec("'' arg", false).validate().unwrap_err().contains("names no program"));

        let mut s = spec("prog", false);
        s.environment = vec!["A=1".into(), "B=".into(), "C=x=y".into()];
        assert_eq!(s.validate(), Ok(()));
        s.environment.push("PRODUCTION".into());
        let e = s.validate().unwrap_err();
        assert!(e.contains("\"PRODUCTION\" is not NAME=value"), "{e}");
        s.environment = vec!["=x".into()];
        assert!(s.validate().unwrap_err().contains("empty name"));
    }

    #[test]
    fn spec_reads_the_seed_format_and_writes_back_everything() {
        let yaml = r#"
service-A:
  runOnInit: "/usr/bin/my-service --config /etc/my-service.conf"
  runOnInitRestart: "yes"
  environment:
    - "ENV=production"
    - "LOG_LEVEL=debug"
  workingDir: /opt/a
backup-job:
  runOnInit: "/usr/local/bin/backup --daily"
  runOnInitRestart: "no"
flags:
  runOnInit: x
  runOnInitRestart: true
bare:
  runOnInit: y
  runOnInitRestart: No
default:
  runOnInit: z
"#;
        let specs: BTreeMap<String, ProcessSpec> = serde_norway::from_str(yaml).unwrap();
        let a = &specs["service-A"];
        assert_eq!(a.run_on_init, "/usr/bin/my-service --config /etc/my-service.conf");
        assert!(a.run_on_init_restart);
        assert_eq!(a.environment, ["ENV=production", "LOG_LEVEL=debug"]);
        assert_eq!(a.extra["workingDir"], serde_norway::Value::String("/opt/a".into()));
        assert!(!specs["backup-job"].run_on_init_restart);
        assert!(specs["flags"].run_on_init_restart);
        assert!(!specs["bare"].run_on_init_restart);
        assert!(!specs["default"].run_on_init_restart);

        let text = serde_norway::to_string(&specs).unwrap();
        // YAML 1.2: a bare `yes` is a string, so it needs no quotes.
        assert!(text.contains("runOnInitRestart: yes") && text.contains("runOnInitRestart: no"), "{text}");
        assert!(text.contains("workingDir: /opt/a"), "{text}");
        let back: BTreeMap<String, ProcessSpec> = serde_norway::from_str(&text).unwrap();
        assert_eq!(back, specs);

        let bad: Result<ProcessSpec, _> = serde_norway::from_str("runOnInit: x\nrunOnInitRestart: sometimes\n");
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("yes, no, true or false"), "{e}");
    }

    #[test]
    fn cut_lines_do_not_end_in_half_a_character() {
        let mut line = LineBuf::default();
        line.push(&[b'a'; MAX_LINE - 1]);
        line.push("é tail".as_bytes());
        let text = line.take();
        assert_eq!(text, format!("{}…", "a".repeat(MAX_LINE - 1)));
        assert!(line.is_empty());
        assert_eq!(complete_utf8_len("aé".as_bytes()), 3);
        assert_eq!(complete_utf8_len(&"a€".as_bytes()[..3]), 1);
    }
}
