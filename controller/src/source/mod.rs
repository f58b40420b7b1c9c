//! Where specs come from: Git (a remote, a local repository, or a folder imported into one)
//! and, with `--kube`, the custom resources of a Kubernetes cluster, both behind the same
//! reconcile.

pub mod git;
pub mod import;
pub mod kube;
pub mod watch;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("git error while {doing}")]
    Git {
        doing: &'static str,
        #[source]
        source: git2::Error,
    },
    #[error("cannot fetch from {url}")]
    Fetch {
        url: String,
        #[source]
        source: git2::Error,
    },
    #[error("{url} has no branch `{branch}`")]
    NoBranch { url: String, branch: String },
    #[error("{url} has no revision `{revision}`")]
    NoRevision { url: String, revision: String },
    #[error("path `{path}` is not a directory at commit {revision}")]
    NoPath { path: String, revision: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot watch {}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("the Git worker thread stopped unexpectedly")]
    Worker(#[source] tokio::task::JoinError),
}
