//! The `flowmetrics` command: `run` (the default), `check-config` and `probe`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use flowmetrics::config::{check_log_filter, Config};
use flowmetrics::logging::{self, write_stderr};
use flowmetrics::{signals, App};

/// What `--help` adds after the commands and options.
const MORE_HELP: &str = "\
With no config file the service runs on its built-in defaults. The file may also be
named by FLOWMETRICS_CONFIG; FLOWMETRICS_<KEY> variables (`__` nests) override it,
e.g. FLOWMETRICS_LISTEN__OTLP_HTTP=0.0.0.0:4318. RUST_LOG overrides log.level.

Signals: SIGTERM, SIGINT stop gracefully (the state file is written); SIGUSR1 writes
the state file now; SIGHUP and SIGUSR2 are logged and ignored.

Exit status:
  0  stopped on SIGTERM/SIGINT; check-config: the configuration is valid
  1  the service could not start or run (a port in use, a store unreachable, ...)
  2  a configuration or usage error (the key and its source are named)
";

/// Exit statuses (docs/operations.md "Exit statuses").
const EXIT_START_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;

/// flowmetrics: OpenTelemetry flow events in, Prometheus RED metrics per flow out.
#[derive(Parser)]
#[command(
    name = "flowmetrics",
    version,
    after_help = MORE_HELP,
    disable_help_subcommand = true
)]
struct Cli {
    /// The config file (else FLOWMETRICS_CONFIG, else the built-in defaults).
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Run,
    /// Validate and print the effective config.
    CheckConfig,
    /// GET URL: exit 0 on 200, 1 otherwise (a healthcheck).
    Probe {
        #[arg(default_value = flowmetrics::probe::DEFAULT_URL)]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` go to stdout with status 0; usage errors to
            // stderr with the configuration error's status.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Probe { url } = &command {
        return probe(url);
    }
    let config = match Config::from_process_env(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            write_stderr(&format!("flowmetrics: configuration error: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // RUST_LOG overrides log.level: checked like it, or the service could run silent.
    if let Some(spec) = logging::rust_log() {
        if let Err(e) = check_log_filter(&spec) {
            write_stderr(&format!(
                "flowmetrics: configuration error: RUST_LOG (environment): {e}"
            ));
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    match command {
        Command::CheckConfig => {
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(config.to_yaml().as_bytes());
            write_stderr("flowmetrics: configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
        Command::Probe { .. } => unreachable!("answered before the config is read"),
    }
}

/// `probe`: needs no config (a healthcheck must not fail on one).
fn probe(url: &str) -> ExitCode {
    let uri = match flowmetrics::probe::parse(url) {
        Ok(uri) => uri,
        Err(e) => {
            eprintln!("flowmetrics: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowmetrics: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(flowmetrics::probe::probe(&uri)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowmetrics probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> ExitCode {
    signals::ignore_file_size_signal();
    let log = logging::init(&config);
    let code = serve(config);
    log.finish();
    code
}

/// A start error reaches stderr whatever the log filter: as a log line if ERROR lines
/// are logged, else written directly.
fn start_failed(message: &str) -> ExitCode {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{message}");
    } else {
        write_stderr(&format!("flowmetrics: {message}"));
    }
    ExitCode::from(EXIT_START_FAILED)
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return start_failed(&format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        // Listen for signals before anything is announced: a SIGTERM right after
        // "started" must shut down gracefully, not kill the process.
        let mut signals = signals::Signals::listen();
        let app = match App::new(config).start().await {
            Ok(app) => app,
            Err(e) => return start_failed(&e.to_string()),
        };
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "flowmetrics started");
        signals.serve_until_stop(&app).await;
        tracing::info!("shutting down: finishing requests in flight");
        app.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}
