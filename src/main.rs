//! The `remora` command: run, validate, demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use remora::app::{App, ConfigSource};
use remora::config;

#[derive(Parser)]
#[command(
    name = "remora",
    version,
    about = "A sidecar L7 proxy for service meshes"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    /// Log level or filter (e.g. `info`, `remora=debug`). Default: `info`, or RUST_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// The YAML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a config file; print every problem; exit 0 if valid, 1 if not.
    Validate {
        /// The YAML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run remora with demo upstreams on loopback; needs nothing else.
    Demo,
    /// Serve remora YAML as xDS (ADS) to remora sidecars and to Envoy.
    ControlPlane {
        /// A YAML file (served to every node), or a directory of them (`<node.cluster>.yaml`,
        /// else `default.yaml`).
        #[arg(short, long)]
        config: PathBuf,
        /// `ip:port` to serve ADS on (h2c gRPC).
        #[arg(long, default_value = "127.0.0.1:18000")]
        address: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    remora::memory::keep_big_allocations_apart();
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    match cli.command {
        Command::Validate { config } => match config::load_file(&config) {
            Ok(_) => {
                println!("{}: valid", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let (raw, text) = match config::load_file(&config) {
                Ok(loaded) => loaded,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = raw.workers.unwrap_or_else(remora::workers::default_workers);
            let source = config.clone();
            run_async(workers, async move {
                let app = App::start(raw, ConfigSource::File(source), &text).await?;
                app.watch_config_file();
                app.run_until_signal().await?;
                Ok(())
            })
        }
        Command::Demo => run_async(remora::workers::default_workers(), remora::demo::run()),
        Command::ControlPlane { config, address } => {
            run_async(remora::workers::default_workers(), async move {
                remora::control_plane::start(&config, address).await?;
                use tokio::signal::unix::{signal, SignalKind};
                let mut term = signal(SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok(())
            })
        }
    }
}

fn run_async(
    workers: usize,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    tracing::info!(
        workers,
        version = env!("CARGO_PKG_VERSION"),
        "starting remora"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("remora-worker")
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("remora: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
