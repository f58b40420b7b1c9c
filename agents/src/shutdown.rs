//! Stopping an agent, or a whole process of agents, in two steps.
//!
//! A graceful stop first stops *claiming*: running tasks may still finish and report. Later,
//! when the grace period is over, it stops the *work*: handlers are cancelled and the tasks they
//! held are handed back to the controller, so another agent can take them at once instead of
//! waiting for their leases to run out.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The two steps of a stop. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Stop {
    claiming: CancellationToken,
    work: CancellationToken,
}

impl Default for Stop {
    fn default() -> Self {
        Stop::new()
    }
}

impl Stop {
    /// A stop whose steps are taken separately; stopping the work stops claiming too.
    pub fn new() -> Stop {
        let work = CancellationToken::new();
        Stop {
            claiming: work.child_token(),
            work,
        }
    }

    /// Both steps at once, when `token` fires: nothing is left to finish.
    pub fn at_once(token: CancellationToken) -> Stop {
        Stop {
            claiming: token.clone(),
            work: token,
        }
    }

    /// Claim nothing more; running tasks go on.
    pub fn stop_claiming(&self) {
        self.claiming.cancel();
    }

    /// Cancel running tasks (they are handed back), and claim nothing more.
    pub fn stop_work(&self) {
        self.work.cancel();
    }

    pub fn claiming(&self) -> &CancellationToken {
        &self.claiming
    }

    pub fn work(&self) -> &CancellationToken {
        &self.work
    }
}

/// SIGTERM (what Kubernetes and systemd send) and SIGINT (Ctrl-C), treated alike.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installed early, so that a signal arriving during start-up is not the default death.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal's name and number.
    pub async fn next(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.term.recv() => ("SIGTERM", libc::SIGTERM),
            _ = self.int.recv() => ("SIGINT", libc::SIGINT),
        }
    }

    /// Calls `first` on the first signal, and exits the process at once on the second, with
    /// the status a shell reports for death by that signal (128 + its number).
    pub fn spawn_two_step(mut self, first: impl FnOnce(&'static str) + Send + 'static) {
        tokio::spawn(async move {
            let (name, _) = self.next().await;
            first(name);
            let (name, number) = self.next().await;
            tracing::warn!(signal = name, "second signal: exiting at once");
            std::process::exit(128 + number);
        });
    }
}
