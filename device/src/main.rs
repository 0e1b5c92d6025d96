//! `tether-device`: the agent that runs on the robot.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use device::{Agent, AgentError, Config};

/// The Tether device agent: connects a robot to a Tether relay and publishes its telemetry.
#[derive(Debug, Parser)]
#[command(name = "tether-device", version, about)]
struct Cli {
    /// The agent's config.yaml.
    #[arg(long, short, env = "TETHER_DEVICE_CONFIG", default_value = "config.yaml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the config file and say exactly what is wrong.
    Check,
}

/// Exit codes: 0 stopped normally, 2 bad configuration, 3 credentials or handshake key refused
/// by the relay, 4 registration rejected by an admin, 5 gave up reconnecting
/// (`maxReconnectAttempts`).
fn main() -> ExitCode {
    let cli = Cli::parse();
    let load = |path: &std::path::Path| {
        Config::load(path).and_then(|mut c| {
            c.apply_env(|k| std::env::var(k).ok(), &path.display().to_string())?;
            Ok(c)
        })
    };
    let checking = matches!(cli.command, Some(Command::Check));
    let mut fallback = None;
    let config = match load(&cli.config) {
        Ok(c) => c,
        Err(e) if checking => {
            eprintln!("tether-device: invalid configuration: {e}");
            return ExitCode::from(2);
        }
        // A config broken by hand must not leave the robot unreachable: run with the last one
        // that worked, and say so loudly.
        Err(e) => match load(&Config::last_good_path(&cli.config)) {
            Ok(c) => {
                eprintln!("tether-device: invalid configuration: {e}");
                fallback = Some(e.to_string());
                c
            }
            Err(_) => {
                eprintln!("tether-device: invalid configuration: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if checking {
        println!(
            "{}: OK (relay {}, {} supervised process(es), commands allowed: {}, local inputs: udp {:?}, socket {:?})",
            cli.config.display(),
            config.server_address,
            config.paths.len(),
            if config.commands.allow.is_empty() { "none".to_owned() } else { config.commands.allow.join(", ") },
            config.telemetry.udp,
            config.telemetry.unix_socket,
        );
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(config.log_level.to_ascii_lowercase())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether-device: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &fallback {
        Some(e) => tracing::error!(
            "{e}; running with the last good configuration ({}) until config.yaml is fixed",
            Config::last_good_path(&cli.config).display()
        ),
        None if !config.client_id.is_empty() => config.save_last_good(&cli.config),
        None => {}
    }
    rt.block_on(async move {
        let (trigger, cancel) = device::link::tokio_util_shim::cancel_pair();
        tokio::spawn(async move {
            // Ctrl-C, or SIGTERM from systemd and friends: stop cleanly either way.
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            trigger.cancel();
        });
        let mut agent = Agent::new(config).with_config_path(cli.config.clone());
        match agent.run(cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ AgentError::Refused { .. }) => {
                tracing::error!("{e}");
                ExitCode::from(3)
            }
            Err(e @ AgentError::Rejected(_)) => {
                tracing::error!("{e}");
                ExitCode::from(4)
            }
            Err(e @ AgentError::GaveUp { .. }) => {
                tracing::error!("{e}");
                ExitCode::from(5)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(2)
            }
        }
    })
}
