//! The `bulkhead` command: run the gateway, or check a config.

// One module, `allocator`, has unsafe code (the global allocator's interface is
// unsafe by nature); nothing else may.
#![deny(unsafe_code)]
#![warn(clippy::unwrap_used)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead::config::LogFormat;
use bulkhead::reload::Trigger;
use bulkhead::{Config, RunningGateway};
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

// mimalloc: the request path allocates many small, short-lived objects (headers,
// futures, body frames); measured +3 % req/s over glibc malloc, one proxy core, wrk
// 64 connections, three alternating runs each (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: allocator::MiMalloc = allocator::MiMalloc;

#[allow(unsafe_code)]
mod allocator;

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "A multi-tenant reverse-proxy gateway",
    // `bulkhead --config F check` would otherwise check ./gateway.toml and pass: the
    // options of a bare `bulkhead` (run) go before no subcommand.
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run(RunArgs),
    /// Print the `sha256:<hex>` digest of the API key read from standard input, for
    /// `api_keys` in gateway.toml (a trailing newline is not part of the key).
    HashKey,
    /// Validate the configuration without serving.
    Check {
        /// Path to gateway.toml.
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Exit 1 on warnings too.
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Path to gateway.toml.
    #[arg(long, default_value = "gateway.toml")]
    config: PathBuf,
    /// Also start built-in echo upstreams on the addresses the config names.
    #[arg(long)]
    demo: bool,
    /// Don't reload when the config file changes (SIGHUP and POST /reload still do).
    #[arg(long)]
    no_watch: bool,
}

fn main() -> ExitCode {
    // Only `main` sets it, so it cannot be set already.
    let _ = bulkhead::RETURN_FREED_MEMORY.set(allocator::give_back);
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config, strict }) => check(config, strict),
        Some(Command::HashKey) => hash_key(),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn hash_key() -> ExitCode {
    use std::io::Read;
    let mut key = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut key) {
        eprintln!("cannot read the key from standard input: {e}");
        return ExitCode::FAILURE;
    }
    // One line ending (as `echo` adds), not every trailing byte of a kind.
    if key.ends_with(b"\r\n") {
        key.truncate(key.len() - 2);
    } else if key.ends_with(b"\n") {
        key.pop();
    }
    if key.is_empty() {
        eprintln!("no key on standard input (usage: printf %s \"$KEY\" | bulkhead hash-key)");
        return ExitCode::FAILURE;
    }
    println!("{}", bulkhead::credentials::hash_key(&key));
    ExitCode::SUCCESS
}

fn check(path: PathBuf, strict: bool) -> ExitCode {
    match Config::load(&path) {
        Ok(c) => {
            let upstreams = c.upstreams.len();
            let suspended = c
                .tenants
                .iter()
                .filter(|t| t.status == bulkhead::config::TenantStatus::Suspended)
                .count();
            println!(
                "{}: ok, version {}: {} tenants ({} suspended), {} upstreams",
                path.display(),
                c.version,
                c.tenants.len(),
                suspended,
                upstreams
            );
            // Settings that will not do what they say, at their key; then the
            // isolation risks of the whole file.
            for w in &c.warnings {
                eprintln!(
                    "{}:{}:{}: warning: {}",
                    path.display(),
                    w.line,
                    w.col,
                    w.message
                );
            }
            let warnings = bulkhead::lint::isolation_warnings(&c);
            for w in &warnings {
                eprintln!("{}: warning: {w}", path.display());
            }
            let count = c.warnings.len() + warnings.len();
            if strict && count > 0 {
                eprintln!(
                    "{}: {count} warning(s); failing because of --strict",
                    path.display(),
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rustls warns about what clients send (an illegal SNI, a renegotiation
        // attempt): at `info` anyone could write the log; those handshakes fail anyway.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.log_format);
    bulkhead::lint::log_warnings(&config, &args.config);
    if args.demo {
        if let Err(e) = bulkhead::demo::spawn_echo_upstreams(&config) {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    // Signal handlers first, so that no SIGTERM kills the process outright: one during
    // the start stops it (exit 1), one after "bulkhead is serving" is logged (a
    // supervisor may send one at once) drains.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the signal runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = {
        let _runtime = rt.enter();
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        )
    };
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = signals else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    bulkhead::server::raise_nofile();
    // The start runs on a thread of its own while this one waits for the signals: it
    // reads files (certificates, the system's trusted roots, the quota state) that can
    // take long or hang (a network mount), and a supervisor's SIGTERM must not wait for
    // it. A SIGHUP stays queued in its stream until the gateway serves.
    let (started_tx, mut started) = tokio::sync::oneshot::channel();
    let starter = std::thread::Builder::new()
        .name("bulkhead-start".into())
        .spawn(move || {
            let _ = started_tx.send(RunningGateway::start(config));
        });
    if let Err(e) = starter {
        tracing::error!("cannot start the start thread: {e}");
        return ExitCode::FAILURE;
    }
    let (signalled, outcome) = rt.block_on(async {
        tokio::select! {
            r = &mut started => (false, r.ok()),
            _ = term.recv() => (true, None),
            _ = int.recv() => (true, None),
        }
    });
    // A start that finished as the signal came is serving: it drains, as after any
    // signal once serving.
    let gateway = match outcome.or_else(|| started.try_recv().ok()) {
        Some(Ok(g)) => g,
        Some(Err(e)) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        None if signalled => {
            // Returning exits the process, the start thread and what it bound with it.
            tracing::error!("stopped before serving: a signal came while the gateway was starting");
            return ExitCode::FAILURE;
        }
        None => {
            tracing::error!("the start failed without saying why");
            return ExitCode::FAILURE;
        }
    };
    gateway.log_serving();
    let watcher = if args.no_watch {
        None
    } else {
        match bulkhead::watch::spawn(gateway.shared.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "{e}; the file is not watched (SIGHUP and POST /reload still reload it)"
                );
                None
            }
        }
    };
    rt.block_on(async move {
        // Not when the signal came as a start finished: that one drains now.
        if !signalled {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    // The outcome is logged, counted and recorded by `reload` itself.
                    _ = hup.recv() => {
                        let _ = bulkhead::reload::reload(&gateway.shared, Trigger::Signal);
                    }
                }
            }
        }
        drop(watcher);
        tracing::info!(
            grace = ?gateway.shared.config.shutdown_grace,
            "draining: no new connections, in-flight requests finish"
        );
        gateway.shutdown();
        let waiter = tokio::task::spawn_blocking(move || gateway.wait());
        tokio::select! {
            _ = waiter => {
                tracing::info!("drained; exiting");
                ExitCode::SUCCESS
            }
            _ = term.recv() => exit_now(),
            _ = int.recv() => exit_now(),
        }
    })
}

/// A second SIGTERM / SIGINT: exit 1 at once. Not by returning: dropping the runtime
/// would wait for the blocking task that joins the draining workers, that is for all
/// of `shutdown_grace`.
fn exit_now() -> ! {
    use std::io::Write;
    tracing::warn!("second signal: exiting without waiting");
    // The log goes to stderr unbuffered; flushed anyway, in case that ever changes.
    let _ = std::io::stderr().flush();
    std::process::exit(1)
}
