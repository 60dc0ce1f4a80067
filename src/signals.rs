//! The signals the service answers: SIGTERM and SIGINT stop it gracefully (the state
//! file is written); SIGUSR1 writes the state file now; SIGHUP and SIGUSR2 are logged
//! and ignored. Left at their defaults, the last three would kill the process at once,
//! with no log line and no state written.

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::RunningApp;

/// A file-size limit (`ulimit -f`) would otherwise kill the process with SIGXFSZ in the
/// middle of a state write; ignored, the write fails with EFBIG, which is reported.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// The handlers, registered up front (before the service announces itself).
pub struct Signals {
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
    hangup: Option<Signal>,
    user1: Option<Signal>,
    user2: Option<Signal>,
}

fn listen(kind: SignalKind, name: &str) -> Option<Signal> {
    signal(kind)
        .inspect_err(|e| tracing::warn!("cannot handle {name}: {e}"))
        .ok()
}

async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl Signals {
    /// Starts listening for SIGTERM and SIGINT.
    pub fn listen() -> Self {
        Self {
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            hangup: listen(SignalKind::hangup(), "SIGHUP"),
            user1: listen(SignalKind::user_defined1(), "SIGUSR1"),
            user2: listen(SignalKind::user_defined2(), "SIGUSR2"),
        }
    }

    /// Answers SIGHUP, SIGUSR1 and SIGUSR2 until SIGTERM or SIGINT arrives.
    pub async fn serve_until_stop(&mut self, app: &RunningApp) {
        loop {
            tokio::select! {
                _ = recv(&mut self.terminate) => return,
                _ = recv(&mut self.interrupt) => return,
                _ = recv(&mut self.hangup) => tracing::warn!(
                    "SIGHUP received: the configuration is read at start only; restart to \
                     apply a change (carrying on)"
                ),
                _ = recv(&mut self.user1) => {
                    if app.checkpoint_now() {
                        tracing::info!("SIGUSR1 received: writing the state file now");
                    } else {
                        tracing::info!("SIGUSR1 received: no state file is configured (carrying on)");
                    }
                }
                _ = recv(&mut self.user2) => {
                    tracing::info!("SIGUSR2 received: it has no action (carrying on)");
                }
            }
        }
    }
}
