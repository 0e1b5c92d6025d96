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
    let config = match Config::load(&cli.config).and_then(|mut c| {
        c.apply_env(|k| std::env::var(k).ok(), &cli.config.display().to_string())?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-device: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Some(Command::Check)) {
        println!("{}: OK", cli.config.display());
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
