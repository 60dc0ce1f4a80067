//! The `flowmetrics` command: `run` (the default), `check-config` and `probe`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use flowmetrics::config::{Config, LogFormat};
use flowmetrics::App;

const USAGE: &str = "\
flowmetrics: OpenTelemetry flow events in, Prometheus RED metrics per flow out.

Usage:
  flowmetrics [run] [--config PATH]        run the service
  flowmetrics check-config [--config PATH] validate and print the effective config
  flowmetrics probe [URL]                  GET URL (default http://127.0.0.1:9464/readyz):
                                           exit 0 on 200, 1 otherwise (a healthcheck)
  flowmetrics --help | --version

With no config file the service runs on its built-in defaults. The file may also be
named by FLOWMETRICS_CONFIG; FLOWMETRICS_<KEY> variables (`__` nests) override it,
e.g. FLOWMETRICS_LISTEN__OTLP_HTTP=0.0.0.0:4318. RUST_LOG overrides log.level.
";

enum Command {
    Run,
    CheckConfig,
    Probe(Option<String>),
}

fn parse_args() -> Result<(Command, Option<PathBuf>), String> {
    let mut command = None;
    let mut config = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                println!("flowmetrics {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "-c" | "--config" => {
                config = Some(PathBuf::from(args.next().ok_or("--config needs a path")?));
            }
            s if s.starts_with("--config=") => {
                config = Some(PathBuf::from(&s["--config=".len()..]))
            }
            "run" if command.is_none() => command = Some(Command::Run),
            "check-config" if command.is_none() => command = Some(Command::CheckConfig),
            "probe" if command.is_none() => command = Some(Command::Probe(None)),
            url if matches!(command, Some(Command::Probe(None))) && !url.starts_with('-') => {
                command = Some(Command::Probe(Some(url.to_string())))
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok((command.unwrap_or(Command::Run), config))
}

fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::EnvFilter>().ok())
        .unwrap_or_else(|| {
            config
                .log
                .level
                .parse()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    // Colour only for a person at a terminal: not in files, pipes, journald or
    // `docker logs`; NO_COLOR (https://no-color.org) turns it off there too.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let (command, config_path) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("flowmetrics: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Command::Probe(url) = &command {
        return probe(url.as_deref().unwrap_or(flowmetrics::probe::DEFAULT_URL));
    }
    let config = match Config::from_process_env(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flowmetrics: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::CheckConfig => {
            print!("{}", config.to_yaml());
            eprintln!("flowmetrics: configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
        Command::Probe(_) => unreachable!("answered before the config is read"),
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
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowmetrics: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Listen for signals before anything is announced: a SIGTERM right after
        // "started" must shut down gracefully, not kill the process.
        let stop = StopSignal::listen();
        let app = match App::new(config).start().await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "flowmetrics started");
        stop.wait().await;
        tracing::info!("shutting down: finishing requests in flight");
        app.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// SIGTERM or SIGINT (Ctrl-C), registered up front.
struct StopSignal {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl StopSignal {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind| {
                signal(kind)
                    .inspect_err(|e| tracing::warn!("cannot listen for a stop signal: {e}"))
                    .ok()
            };
            Self {
                terminate: listen(SignalKind::terminate()),
                interrupt: listen(SignalKind::interrupt()),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn wait(self) {
        #[cfg(unix)]
        {
            async fn recv(signal: Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = recv(self.terminate) => {}
                _ = recv(self.interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
