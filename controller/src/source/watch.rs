//! When to sync: a poll with jitter, a file watch on local repositories and folders, and
//! explicit nudges (the webhook). Every trigger only asks for a sync; the sync itself decides
//! whether anything changed, so a spurious wake-up costs one fetch and a tree comparison.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use rand::Rng;
use tokio::sync::mpsc;

use super::SourceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Start,
    Poll,
    FileChange,
    Nudge,
}

/// Ask for a sync from anywhere (e.g. the webhook handler).
#[derive(Clone)]
pub struct Nudger(mpsc::Sender<Reason>);

impl Nudger {
    pub fn nudge(&self) {
        // A full queue already holds a pending wake-up; one is enough.
        let _ = self.0.try_send(Reason::Nudge);
    }
}

pub struct Triggers {
    rx: mpsc::Receiver<Reason>,
    tx: mpsc::Sender<Reason>,
    poll: Duration,
    started: bool,
    /// Kept alive for as long as the triggers are.
    _watcher: Option<RecommendedWatcher>,
}

/// Changes within this window are one sync: a `git commit` touches several files.
const SETTLE: Duration = Duration::from_millis(50);

impl Triggers {
    pub fn new(poll: Duration) -> Triggers {
        let (tx, rx) = mpsc::channel(16);
        Triggers {
            rx,
            tx,
            poll,
            started: false,
            _watcher: None,
        }
    }

    pub fn nudger(&self) -> Nudger {
        Nudger(self.tx.clone())
    }

    /// Watch `path` (recursively or not) and wake a sync when anything in it changes.
    pub fn watch(&mut self, paths: &[(PathBuf, bool)]) -> Result<(), SourceError> {
        let tx = self.tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.try_send(Reason::FileChange);
                }
            })
            .map_err(|source| SourceError::Watch {
                path: PathBuf::new(),
                source,
            })?;
        for (path, recursive) in paths {
            let mode = if *recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            watcher
                .watch(path, mode)
                .map_err(|source| SourceError::Watch {
                    path: path.clone(),
                    source,
                })?;
        }
        self._watcher = Some(watcher);
        Ok(())
    }

    /// Wait for the next reason to sync. The first call returns at once.
    pub async fn next(&mut self) -> Reason {
        if !self.started {
            self.started = true;
            return Reason::Start;
        }
        // ±10 % so that many controllers polling one server spread out.
        let jitter = rand::rng().random_range(0.9..1.1);
        let reason = tokio::select! {
            reason = self.rx.recv() => reason.unwrap_or(Reason::Poll),
            () = tokio::time::sleep(self.poll.mul_f64(jitter)) => Reason::Poll,
        };
        if reason != Reason::Poll {
            tokio::time::sleep(SETTLE).await;
            while self.rx.try_recv().is_ok() {}
        }
        reason
    }
}
