//! The command line: `serve`, `migrate`, `user create`. Every command reads the same
//! settings (`--config FILE`, then `GATEHOUSE_*`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use crate::app::{self, App};
use crate::clock::SystemClock;
use crate::config::Settings;
use crate::domain::user::Role;
use crate::store::StoreOptions;

#[derive(Parser)]
#[command(name = "gatehouse", version, about = "Self-hosted identity service")]
struct Cli {
    /// A TOML settings file; GATEHOUSE_* variables override it.
    #[arg(long, global = true, env = "GATEHOUSE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve,
    /// Create or update the database schema, then exit.
    Migrate,
    /// Serve only a minimal JSON handler (`GET /`): the framework's ceiling, used as
    /// the baseline of the load benchmark.
    #[command(hide = true)]
    BenchMinimal {
        /// Address to serve on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password is read from standard input.
    Create {
        /// Email address.
        #[arg(long)]
        email: String,
        /// Read the password from standard input (required: never from arguments).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Role: user or admin.
        #[arg(long, default_value = "user", value_parser = ["user", "admin"])]
        role: String,
        /// Mark the email as verified.
        #[arg(long)]
        verified: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatehouse: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&settings);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatehouse: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEHOUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=error"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if settings.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            // The address first: a store once opened takes a lease that only serving's
            // end gives up (see `Store::close`).
            let listener = tokio::net::TcpListener::bind(settings.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {} (GATEHOUSE_LISTEN): {e}", settings.listen))?;
            let app = App::build(&settings).await?;
            tracing::info!(
                listen = %listener.local_addr()?,
                database = app.state.services.store.backend(),
                "gatehouse is serving"
            );
            app.serve(listener, shutdown_signal()).await
        }
        Command::BenchMinimal { listen } => {
            let router = axum::Router::new()
                .route("/", axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }));
            let listener = tokio::net::TcpListener::bind(listen).await?;
            axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await?;
            Ok(())
        }
        Command::Migrate => {
            crate::store::open(
                &settings.database_url(),
                &StoreOptions { max_connections: 1, session_cache_entries: 0, ..settings.store_options() },
            )
            .await?;
            println!("database is up to date");
            Ok(())
        }
        Command::User { command: UserCommand::Create { email, password_stdin: _, role, verified } } => {
            let mut pw = String::new();
            std::io::stdin().read_to_string(&mut pw)?;
            let pw = SecretString::from(pw.trim_end_matches(['\r', '\n']).to_owned());
            let role = if role == "admin" { Role::Admin } else { Role::User };
            // A one-shot command answers no Bearer check: no session memory, no lease.
            let settings = Settings { session_cache_entries: 0, ..settings };
            let services = app::services(&settings, Arc::new(SystemClock), false).await?;
            let user = services.create_user_directly(&email, pw, role, verified).await.map_err(|e| match e {
                crate::service::Error::Validation(errs) => anyhow::anyhow!(
                    "{}",
                    errs.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ")
                ),
                other => anyhow::anyhow!("{other}"),
            })?;
            println!("{}", user.id);
            Ok(())
        }
    }
}

/// Completes at the first SIGTERM or Ctrl-C: the service then stops gracefully
/// (`App::serve`). A second signal stops the process at once (exit status 130), for an
/// operator who does not want to wait for the requests and checks under way; what was
/// acknowledged is kept, as after `kill -9`.
async fn shutdown_signal() {
    let mut signals = Signals::new();
    signals.next().await;
    tracing::info!("shutting down; a second signal stops at once");
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!("second signal: stopping at once");
        std::process::exit(130);
    });
}

/// SIGTERM and SIGINT (Ctrl-C), each time one arrives.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! { _ = recv(&mut self.term) => {}, _ = recv(&mut self.int) => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
