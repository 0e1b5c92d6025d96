//! `tether-relay`: run the relay, or manage its store from the command line.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use relay::RelayConfig;
use relay::auth;
use relay::store::{OperatorRole, Store, q};

/// The Tether relay: telemetry, commands and video signaling between robots and pilots.
///
/// Without a subcommand it serves. Subcommands manage the store directly (they work while the
/// relay runs; SQLite handles the locking). Secrets are printed once and never stored in clear.
#[derive(Debug, Parser)]
#[command(name = "tether-relay", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    config: RelayConfig,
    /// Print created credentials as JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Create the store if needed and, on an empty one, the `default` organisation and the
    /// `admin` operator (key from TETHER_ADMIN_KEY, or generated and printed once). Then exit.
    Init,
    /// Organisations.
    #[command(subcommand)]
    Org(OrgCmd),
    /// Device credentials.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Operators (pilots and admins).
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Operator API keys.
    #[command(subcommand)]
    Key(KeyCmd),
}

#[derive(Debug, Subcommand)]
enum OrgCmd {
    /// Create an organisation.
    Create {
        /// Its unique name (also its id).
        name: String,
    },
    /// List organisations.
    List,
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Create a device and print its clientID and clientSecret (once).
    Create {
        /// Organisation name or id.
        #[arg(long, default_value = "default")]
        org: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// clientID to use (default: dev-<random>).
        #[arg(long)]
        id: Option<String>,
    },
    /// List an organisation's devices.
    List {
        /// Organisation name or id.
        #[arg(long, default_value = "default")]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorCmd {
    /// Create an operator and print an API key for it (once).
    Create {
        /// Organisation name or id.
        #[arg(long, default_value = "default")]
        org: String,
        /// Login name.
        #[arg(long)]
        username: String,
        /// pilot or admin.
        #[arg(long, default_value = "pilot", value_parser = ["pilot", "admin"])]
        role: String,
        /// For pilots: the level on every device of the org (finer grants: the admin API).
        #[arg(long, default_value = "view", value_parser = ["none", "view", "control", "admin"])]
        access: String,
    },
    /// Set an operator's console password, read from standard input (one line).
    Passwd {
        /// Operator username or id.
        #[arg(long)]
        username: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Create another API key for an operator and print it (once).
    Create {
        /// Operator username or id.
        #[arg(long)]
        operator: String,
        /// A note saying what the key is for.
        #[arg(long)]
        label: Option<String>,
    },
}

fn init_logging(level: &str) {
    let debug_mode =
        std::env::var("DEBUG_MODE").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    let level = if debug_mode { "debug".to_owned() } else { level.to_ascii_lowercase() };
    let filter = tracing_subscriber::EnvFilter::try_new(&level).unwrap_or_else(|e| {
        eprintln!("LOG_LEVEL {level:?} is not a valid filter ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn print_secret(json: bool, value: serde_json::Value, human: String) {
    if json {
        println!("{value}");
    } else {
        println!("{human}");
    }
}

fn manage(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    let store = Store::open(&cli.config.db_path()).context("opening the store")?;
    let json = cli.json;
    store.call_sync(|c| -> Result<(), relay::store::StoreError> {
        match cmd {
            Command::Serve | Command::Init => unreachable!("handled by main"),
            Command::Org(OrgCmd::Create { name }) => {
                q::create_org(c, name, name)?;
                print_secret(json, serde_json::json!({"org": name}), format!("Created organisation {name:?}."));
            }
            Command::Org(OrgCmd::List) => {
                for o in q::list_orgs(c)? {
                    println!("{}", o.name);
                }
            }
            Command::Device(DeviceCmd::Create { org, name, id }) => {
                let org = q::find_org(c, org)?.ok_or_else(|| relay::store::StoreError::NotFound(format!("organisation {org:?}")))?;
                let id = id.clone().unwrap_or_else(|| format!("dev-{}", auth::random_hex(6)));
                let secret = auth::issue_device_sync(c, &id, &org.id, name)?;
                print_secret(
                    json,
                    serde_json::json!({"clientID": id, "clientSecret": secret, "org": org.name}),
                    format!("Created device {name:?} in organisation {:?}.\nclientID:     {id}\nclientSecret: {secret}\n(The secret is shown only now; put both in the device's config.yaml.)", org.name),
                );
            }
            Command::Device(DeviceCmd::List { org }) => {
                let org = q::find_org(c, org)?.ok_or_else(|| relay::store::StoreError::NotFound(format!("organisation {org:?}")))?;
                for d in q::list_devices(c, &org.id)? {
                    println!("{}\t{}", d.id, d.name);
                }
            }
            Command::Operator(OperatorCmd::Passwd { username }) => {
                let op = q::find_operator(c, username)?
                    .ok_or_else(|| relay::store::StoreError::NotFound(format!("operator {username:?}")))?;
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map_err(|e| relay::store::StoreError::Task(e.to_string()))?;
                let password = line.trim_end_matches(['\r', '\n']);
                if password.len() < 10 {
                    return Err(relay::store::StoreError::Task("passwords need at least 10 characters".into()));
                }
                let hash = bcrypt::hash(password, auth::PASSWORD_COST).map_err(|e| relay::store::StoreError::Task(e.to_string()))?;
                q::set_password(c, &op.id, &hash)?;
                println!("Password set for {:?}.", op.username);
            }
            Command::Operator(OperatorCmd::Create { org, username, role, access }) => {
                let org = q::find_org(c, org)?.ok_or_else(|| relay::store::StoreError::NotFound(format!("organisation {org:?}")))?;
                let role = OperatorRole::parse(role).unwrap_or(OperatorRole::Pilot);
                let id = format!("op-{}", auth::random_hex(6));
                q::create_operator(c, &id, &org.id, username, role)?;
                if role == OperatorRole::Pilot && access != "none" {
                    q::set_permission(c, &id, "org", access)?;
                }
                let key = auth::issue_api_key_sync(c, &id, Some("created by CLI"))?;
                print_secret(
                    json,
                    serde_json::json!({"operatorID": id, "username": username, "role": role.as_str(), "apiKey": key}),
                    format!("Created {} {username:?} in organisation {:?}.\nAPI key: {key}\n(The key is shown only now.)", role.as_str(), org.name),
                );
            }
            Command::Key(KeyCmd::Create { operator, label }) => {
                let op = q::find_operator(c, operator)?.ok_or_else(|| relay::store::StoreError::NotFound(format!("operator {operator:?}")))?;
                let key = auth::issue_api_key_sync(c, &op.id, label.as_deref())?;
                print_secret(json, serde_json::json!({"apiKey": key}), format!("API key for {:?}: {key}\n(The key is shown only now.)", op.username));
            }
        }
        Ok(())
    })?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        None | Some(Command::Serve) => {}
        Some(Command::Init) => {
            let store = Store::open(&cli.config.db_path()).context("opening the store")?;
            let b =
                relay::server::bootstrap(&store, cli.config.admin_key.as_deref()).context("initialising the store")?;
            print_bootstrap(b.as_ref());
            if b.is_none() {
                eprintln!("The store at {} is already initialised.", cli.config.db_path().display());
            }
            return Ok(());
        }
        Some(cmd) => return manage(&cli, cmd),
    }
    init_logging(&cli.config.log_level);
    if cli.config.max_message_size < 1024 {
        bail!("--max-message-size must be at least 1024 bytes");
    }
    let running = relay::start(cli.config.clone()).await.context("starting the relay")?;
    print_bootstrap(running.bootstrap.as_ref());
    println!("tether-relay listening on http://{}", running.addr);
    shutdown_signal().await;
    tracing::info!("shutting down: closing connections");
    running.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

fn print_bootstrap(b: Option<&relay::server::Bootstrap>) {
    if let Some(b) = b {
        match &b.generated_key {
            Some(key) => eprintln!(
                "\n==================== FIRST START ====================\n\
                 Created organisation {:?} and admin operator {:?}.\n\
                 Admin API key (shown only now, store it safely):\n\n    {key}\n\n\
                 Use it to log in to the console and for the API.\n\
                 =====================================================\n",
                b.org, b.username
            ),
            None => eprintln!(
                "First start: created organisation {:?} and admin {:?} with the key from TETHER_ADMIN_KEY.",
                b.org, b.username
            ),
        }
    }
}
