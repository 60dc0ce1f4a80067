//! Logs carry ANSI colour only when stderr is a terminal.

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics");

/// The service on ephemeral ports, text logs, stopped by SIGINT after a second.
fn service(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("FLOWMETRICS_") || k == "RUST_LOG" || k == "NO_COLOR" {
            c.env_remove(k);
        }
    }
    c.envs([
        ("FLOWMETRICS_LISTEN__METRICS", "127.0.0.1:0"),
        ("FLOWMETRICS_LISTEN__OTLP_HTTP", "127.0.0.1:0"),
        ("FLOWMETRICS_LISTEN__OTLP_GRPC", "127.0.0.1:0"),
        ("FLOWMETRICS_LOG__FORMAT", "text"),
    ]);
    c
}

#[test]
fn no_colour_when_stderr_is_not_a_terminal() {
    let out = service("timeout", &["-s", "INT", "1", BIN])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("flowmetrics started"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in piped logs: {stderr:?}"
    );
}

#[test]
fn colour_on_a_terminal_unless_no_color() {
    // util-linux `script` runs the service on a pseudo-terminal.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` (util-linux) to provide a terminal");
        return;
    }
    let run = |no_color: bool| {
        let mut c = service(
            "script",
            &["-qec", &format!("timeout -s INT 1 {BIN}"), "/dev/null"],
        );
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c.stdin(Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tty = run(false);
    assert!(tty.contains("flowmetrics started"), "{tty}");
    assert!(tty.contains("\x1b["), "no colour on a terminal: {tty:?}");
    let plain = run(true);
    assert!(plain.contains("flowmetrics started"), "{plain}");
    assert!(!plain.contains('\x1b'), "NO_COLOR ignored: {plain:?}");
}
