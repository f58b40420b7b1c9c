//! The Git side of write-back: status commits and result commits, built in the source's
//! mirror and pushed to the remote.
//!
//! Pushes never force. A push the remote refuses (someone else pushed first) is followed by a
//! fetch, the same change re-applied onto the new head, and another push, with backoff. The
//! status change is a replacement of `.agentops/status/` and `.agentops/STATUS.md` in the
//! head's tree, so "rebasing" it is re-applying it to whatever the new head is; nothing
//! outside `.agentops/` is ever written.
//!
//! Everything here blocks: callers run it on `spawn_blocking`.

use crate::telemetry::{CommitKind, CommitPushed, InternalEvent, PushRefused};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use git2::{FileMode, Oid, PushOptions, Repository, Signature, Tree};

use super::WritebackError;
use super::paths::{OutputFile, OutputMode, PathError};
use super::render::{BOARD, DIR, Delta, STATUS_DIR};
use crate::source::git::{GitSource, Location, REVISION_TRAILER};

/// Who the controller's commits are by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl Default for Author {
    fn default() -> Self {
        Author {
            name: "agentops".to_owned(),
            email: "agentops@localhost".to_owned(),
        }
    }
}

impl Author {
    fn signature(&self) -> Result<Signature<'static>, WritebackError> {
        Signature::now(&self.name, &self.email).map_err(git("making a signature"))
    }
}

/// How often and how patiently a refused push is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    /// The wait after the first refusal; doubled after each further one, up to a second.
    pub backoff: Duration,
}

impl Retry {
    fn next(wait: Duration) -> Duration {
        wait.saturating_mul(2).min(Duration::from_secs(1))
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            backoff: Duration::from_millis(50),
        }
    }
}

pub(super) fn git(doing: &'static str) -> impl Fn(git2::Error) -> WritebackError {
    move |source| WritebackError::Git { doing, source }
}

/// Why one push did not land.
#[derive(Debug)]
pub enum PushFailure {
    /// The remote refused the ref (not a fast-forward, or a hook said no).
    Rejected(String),
    /// The push did not get through (network, authentication, a locked ref).
    Failed(git2::Error),
    /// The local repository has edits in the files the push would refresh.
    LocalEdits(String),
}

impl PushFailure {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PushFailure::Rejected(_) => "rejected",
            PushFailure::Failed(_) => "failed",
            PushFailure::LocalEdits(_) => "local_edits",
        }
    }

    fn refused(&self, kind: CommitKind, branch: &str, attempt: u32) {
        PushRefused {
            kind,
            branch,
            attempt,
            reason: self.metric_label(),
            message: &self.to_string(),
        }
        .emit();
    }
}

impl std::fmt::Display for PushFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushFailure::Rejected(why) => write!(f, "refused by the remote: {why}"),
            PushFailure::Failed(e) => write!(f, "push failed: {}", e.message()),
            PushFailure::LocalEdits(path) => write!(
                f,
                "the local repository has uncommitted edits in {path}; waiting for them"
            ),
        }
    }
}

/// Push `commit` to `refs/heads/<branch>` of the source's remote, as a fast-forward only, and
/// check what the remote said about the ref. For a local non-bare repository with that
/// branch checked out, the pushed files under `refresh` are then brought into its index and
/// working tree (git's `updateInstead`, limited to those paths).
fn push(
    repo: &Repository,
    source: &GitSource,
    commit: Oid,
    branch: &str,
    old: Option<Oid>,
    refresh: Option<&[String]>,
) -> Result<(), PushFailure> {
    let dest = format!("refs/heads/{branch}");
    if let Location::Folder(_) = source.location {
        // An imported folder has no remote: its repository is the truth. Compare and swap.
        let result = match old {
            Some(old) => repo.reference_matching(&dest, commit, true, old, "agentops"),
            None => repo.reference(&dest, commit, false, "agentops"),
        };
        return result.map(drop).map_err(|e| match e.code() {
            git2::ErrorCode::Modified | git2::ErrorCode::Exists => {
                PushFailure::Rejected(e.message().to_owned())
            }
            _ => PushFailure::Failed(e),
        });
    }
    match &source.location {
        Location::Local(path) => return push_local(repo, path, commit, branch, old, refresh),
        // libgit2's local transport moves the remote's ref without checking it still holds
        // the value the push was built on, so a person's push landing in between would be
        // lost. A `file://` remote is a repository on this machine: push to it the same way
        // as to a local one, with a compare-and-swap.
        Location::Remote(url) if url.starts_with("file://") => {
            let path = Path::new(url.trim_start_matches("file://"));
            return push_local(repo, path, commit, branch, old, None);
        }
        _ => {}
    }
    let local_ref = "refs/agentops/push";
    repo.reference(local_ref, commit, true, "agentops: push")
        .map_err(PushFailure::Failed)?;
    let mut remote = repo.find_remote("origin").map_err(PushFailure::Failed)?;
    let refused: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let mut callbacks = source.callbacks();
    {
        let refused = refused.clone();
        callbacks.push_update_reference(move |refname, status| {
            if let Some(status) = status {
                *refused.lock().expect("refusal lock") = Some(format!("{refname}: {status}"));
            }
            Ok(())
        });
    }
    let mut options = PushOptions::new();
    options.remote_callbacks(callbacks);
    let refspec = format!("{local_ref}:{dest}");
    let pushed = remote.push(&[refspec.as_str()], Some(&mut options));
    if let Some(why) = refused.lock().expect("refusal lock").take() {
        return Err(PushFailure::Rejected(why));
    }
    if let Err(e) = pushed {
        // Local transports report a non-fast-forward as an error rather than a ref status.
        return Err(match e.code() {
            git2::ErrorCode::NotFastForward => PushFailure::Rejected(e.message().to_owned()),
            _ if e.message().contains("fast-forward") || e.message().contains("fastforward") => {
                PushFailure::Rejected(e.message().to_owned())
            }
            _ => PushFailure::Failed(e),
        });
    }
    // The mirror knows what the remote now has, so the next sync and flush start from it.
    let tracking = format!("refs/remotes/origin/{branch}");
    repo.reference(&tracking, commit, true, "agentops: pushed")
        .map_err(PushFailure::Failed)?;
    Ok(())
}

/// A push into a repository on this machine: libgit2's local transport cannot push to a
/// non-bare repository, so the new objects are copied into it and its branch is moved with a
/// compare-and-swap (the same guarantee as a fast-forward-only push: it moves only from the
/// head the commit was built on). With the branch checked out, the pushed files under
/// `refresh` are then brought into its index and working tree, unless a person has edits
/// there, in which case nothing moves and the push is retried later.
fn push_local(
    repo: &Repository,
    path: &Path,
    commit: Oid,
    branch: &str,
    old: Option<Oid>,
    refresh: Option<&[String]>,
) -> Result<(), PushFailure> {
    let local = Repository::open(path).map_err(PushFailure::Failed)?;
    let checkout = match refresh {
        Some(paths) if checked_out(path, branch).is_some() => {
            let old_tree = old
                .and_then(|o| repo.find_commit(o).ok())
                .and_then(|c| c.tree().ok());
            let new_tree = repo
                .find_commit(commit)
                .and_then(|c| c.tree())
                .map_err(PushFailure::Failed)?;
            let changed = changed_paths(repo, old_tree.as_ref(), &new_tree, paths);
            check_clean(&local, &changed)?;
            Some(changed)
        }
        _ => None,
    };
    copy_objects(repo, &local, commit).map_err(PushFailure::Failed)?;
    let dest = format!("refs/heads/{branch}");
    let moved = match old {
        Some(old) => local.reference_matching(&dest, commit, true, old, "agentops: push"),
        None => local.reference(&dest, commit, false, "agentops: push"),
    };
    moved.map_err(|e| match e.code() {
        git2::ErrorCode::Modified | git2::ErrorCode::Exists => PushFailure::Rejected(format!(
            "{dest}: moved since (not a fast-forward): {}",
            e.message()
        )),
        _ => PushFailure::Failed(e),
    })?;
    let tracking = format!("refs/remotes/origin/{branch}");
    repo.reference(&tracking, commit, true, "agentops: pushed")
        .map_err(PushFailure::Failed)?;
    if let Some(changed) = checkout {
        refresh_checkout(&local, repo, &changed).map_err(PushFailure::Failed)?;
    }
    Ok(())
}

/// Copy `commit` and the trees and blobs it adds into `to`; its parents are `to`'s already
/// (the commit was built on a head read from it).
fn copy_objects(from: &Repository, to: &Repository, commit: Oid) -> Result<(), git2::Error> {
    let (src, dst) = (from.odb()?, to.odb()?);
    fn copy(
        src: &git2::Odb<'_>,
        dst: &git2::Odb<'_>,
        from: &Repository,
        oid: Oid,
    ) -> Result<(), git2::Error> {
        if dst.exists(oid) {
            return Ok(());
        }
        let object = src.read(oid)?;
        let kind = object.kind();
        if kind == git2::ObjectType::Tree {
            let tree = from.find_tree(oid)?;
            for entry in tree.iter() {
                if matches!(
                    entry.kind(),
                    Some(git2::ObjectType::Tree | git2::ObjectType::Blob)
                ) {
                    copy(src, dst, from, entry.id())?;
                }
            }
        }
        dst.write(kind, object.data())?;
        Ok(())
    }
    let tree = from.find_commit(commit)?.tree_id();
    copy(&src, &dst, from, tree)?;
    copy(&src, &dst, from, commit)
}

/// The local repository at `path` when it is non-bare and has `branch` checked out.
fn checked_out(path: &Path, branch: &str) -> Option<Repository> {
    let local = Repository::open(path).ok()?;
    if local.is_bare() {
        return None;
    }
    let target = format!("refs/heads/{branch}");
    let on_branch = {
        let head = local.find_reference("HEAD").ok()?;
        head.symbolic_target().ok().flatten() == Some(target.as_str())
    };
    on_branch.then_some(local)
}

/// Paths under the given prefixes whose blobs differ between two trees.
fn changed_paths(
    repo: &Repository,
    old: Option<&Tree<'_>>,
    new: &Tree<'_>,
    prefixes: &[String],
) -> Vec<(String, Option<Oid>, Option<Oid>)> {
    let mut files: BTreeMap<String, (Option<Oid>, Option<Oid>)> = BTreeMap::new();
    let mut collect = |tree: &Tree<'_>, new_side: bool| {
        for prefix in prefixes {
            let entry = match tree.get_path(Path::new(prefix)) {
                Ok(e) => e,
                Err(_) => continue,
            };
            let mut add = |path: String, id: Oid| {
                let slot = files.entry(path).or_default();
                if new_side {
                    slot.1 = Some(id);
                } else {
                    slot.0 = Some(id);
                }
            };
            match entry.kind() {
                Some(git2::ObjectType::Blob) => add(prefix.clone(), entry.id()),
                Some(git2::ObjectType::Tree) => {
                    if let Ok(sub) = repo.find_tree(entry.id()) {
                        let _ = sub.walk(git2::TreeWalkMode::PreOrder, |dir, e| {
                            if e.kind() == Some(git2::ObjectType::Blob)
                                && let Ok(name) = e.name()
                            {
                                add(format!("{prefix}/{dir}{name}"), e.id());
                            }
                            git2::TreeWalkResult::Ok
                        });
                    }
                }
                _ => {}
            }
        }
    };
    if let Some(old) = old {
        collect(old, false);
    }
    collect(new, true);
    files
        .into_iter()
        .filter(|(_, (a, b))| a != b)
        .map(|(p, (a, b))| (p, a, b))
        .collect()
}

/// Refuse to refresh files a person is editing: in both the index and the working tree each
/// must match the old commit (or already be what the new one brings).
fn check_clean(
    local: &Repository,
    changed: &[(String, Option<Oid>, Option<Oid>)],
) -> Result<(), PushFailure> {
    let index = local.index().map_err(PushFailure::Failed)?;
    let workdir = local.workdir().expect("non-bare").to_owned();
    for (path, old, new) in changed {
        let in_index = index.get_path(Path::new(path), 0).map(|e| e.id);
        let on_disk = match std::fs::read(workdir.join(path)) {
            Ok(bytes) => Some(
                Oid::hash_object(git2::ObjectType::Blob, &bytes).map_err(PushFailure::Failed)?,
            ),
            Err(_) => None,
        };
        // What is there is either what the old commit had, or already what we bring. A file
        // neither committed nor staged is a leftover of an earlier refresh (a person's commit
        // dropped it from the index): ours to overwrite.
        let known = |id: Option<Oid>| id == *old || id == *new;
        let untracked_leftover =
            old.is_none() && in_index.is_none() && path.starts_with(&format!("{DIR}/"));
        if !known(in_index) || !(known(on_disk) || untracked_leftover) {
            return Err(PushFailure::LocalEdits(path.clone()));
        }
    }
    Ok(())
}

fn refresh_checkout(
    local: &Repository,
    repo: &Repository,
    changed: &[(String, Option<Oid>, Option<Oid>)],
) -> Result<(), git2::Error> {
    let mut index = local.index()?;
    let workdir = local.workdir().expect("non-bare").to_owned();
    for (path, _, new) in changed {
        let full = workdir.join(path);
        match new {
            Some(blob) => {
                let content = repo.find_blob(*blob)?.content().to_vec();
                if let Some(dir) = full.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| git2::Error::from_str(&e.to_string()))?;
                }
                std::fs::write(&full, &content)
                    .map_err(|e| git2::Error::from_str(&e.to_string()))?;
                index.add_path(Path::new(path))?;
            }
            None => {
                let _ = std::fs::remove_file(&full);
                index.remove_path(Path::new(path))?;
            }
        }
    }
    index.write()
}

/// A tree with `name` set to `entry` (or removed), starting from `base`.
fn with_entry(
    repo: &Repository,
    base: Option<&Tree<'_>>,
    name: &str,
    entry: Option<(Oid, i32)>,
) -> Result<Oid, WritebackError> {
    let mut builder = repo.treebuilder(base).map_err(git("building a tree"))?;
    match entry {
        Some((id, mode)) => {
            builder
                .insert(name, id, mode)
                .map_err(git("adding a tree entry"))?;
        }
        None => {
            if builder
                .get(name)
                .map_err(git("reading a tree entry"))?
                .is_some()
            {
                builder.remove(name).map_err(git("removing a tree entry"))?;
            }
        }
    }
    builder.write().map_err(git("writing a tree"))
}

fn subtree<'r>(repo: &'r Repository, tree: &Tree<'_>, name: &str) -> Option<Tree<'r>> {
    let entry = tree.get_name(name)?;
    (entry.kind() == Some(git2::ObjectType::Tree))
        .then(|| repo.find_tree(entry.id()).ok())
        .flatten()
}

/// The status commits' state: the blob of every status file, kept between flushes so that a
/// flush writes only the changed files' blobs and builds the tree once.
pub struct StatusGit {
    pub source: GitSource,
    pub author: Author,
    pub retry: Retry,
    files: BTreeMap<String, Oid>,
    board: Option<Oid>,
    /// A flush failed to land: the next one pushes even if nothing changed since.
    pending: bool,
}

/// What one flush did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// The status commit that landed; `None` when the status in Git was already current.
    pub commit: Option<Oid>,
    /// Refusals on the way, retried: each becomes an event.
    pub refusals: Vec<String>,
}

impl StatusGit {
    pub fn new(source: GitSource, author: Author, retry: Retry) -> StatusGit {
        StatusGit {
            source,
            author,
            retry,
            files: BTreeMap::new(),
            board: None,
            pending: false,
        }
    }

    /// Whether a flush with an empty delta still has something to push.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Write the delta's blobs, then commit the whole status onto the branch head and push,
    /// retrying refusals. On error the status stays pending for the next flush.
    pub fn flush(
        &mut self,
        delta: &Delta,
        revision: Option<&str>,
    ) -> Result<Flushed, WritebackError> {
        let repo = self.source.open()?;
        for (name, content) in &delta.projects {
            match content {
                Some(content) => {
                    let blob = repo
                        .blob(content.as_bytes())
                        .map_err(git("writing a status file"))?;
                    self.files.insert(name.clone(), blob);
                }
                None => {
                    self.files.remove(name);
                }
            }
        }
        if let Some(board) = &delta.board {
            self.board = Some(
                repo.blob(board.as_bytes())
                    .map_err(git("writing the board"))?,
            );
        }
        self.pending = true;
        let status_tree = if self.files.is_empty() {
            None
        } else {
            let mut builder = repo.treebuilder(None).map_err(git("building a tree"))?;
            for (name, blob) in &self.files {
                builder
                    .insert(name, *blob, FileMode::Blob.into())
                    .map_err(git("adding a status file"))?;
            }
            Some(builder.write().map_err(git("writing the status tree"))?)
        };
        let message = status_message(self.files.len(), revision);
        let signature = self.author.signature()?;
        let mut flushed = Flushed::default();
        let mut wait = self.retry.backoff;
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(wait);
                wait = Retry::next(wait);
            }
            self.source.refresh(&repo, &[])?;
            let head = self.source.head(&repo)?;
            let head_commit = repo.find_commit(head).map_err(git("reading the head"))?;
            let root = head_commit.tree().map_err(git("reading the head's tree"))?;
            let ours = subtree(&repo, &root, DIR);
            let dir = with_entry(
                &repo,
                ours.as_ref(),
                STATUS_DIR,
                status_tree.map(|t| (t, FileMode::Tree.into())),
            )?;
            let dir_tree = repo.find_tree(dir).map_err(git("reading a tree"))?;
            let dir = with_entry(
                &repo,
                Some(&dir_tree),
                BOARD,
                self.board.map(|b| (b, FileMode::Blob.into())),
            )?;
            let dir_tree = repo.find_tree(dir).map_err(git("reading a tree"))?;
            let new_root = with_entry(
                &repo,
                Some(&root),
                DIR,
                (!dir_tree.is_empty()).then_some((dir, FileMode::Tree.into())),
            )?;
            if new_root == root.id() {
                self.pending = false;
                return Ok(flushed);
            }
            let new_root = repo.find_tree(new_root).map_err(git("reading a tree"))?;
            let commit = repo
                .commit(
                    None,
                    &signature,
                    &signature,
                    &message,
                    &new_root,
                    &[&head_commit],
                )
                .map_err(git("committing the status"))?;
            let refresh = [format!("{DIR}/{STATUS_DIR}"), format!("{DIR}/{BOARD}")];
            match push(
                &repo,
                &self.source,
                commit,
                &self.source.branch,
                Some(head),
                Some(&refresh),
            ) {
                Ok(()) => {
                    self.pending = false;
                    flushed.commit = Some(commit);
                    CommitPushed {
                        kind: CommitKind::Status,
                        branch: &self.source.branch,
                        commit,
                    }
                    .emit();
                    return Ok(flushed);
                }
                Err(failure) => {
                    failure.refused(CommitKind::Status, &self.source.branch, attempt);
                    flushed.refusals.push(failure.to_string());
                }
            }
        }
        Err(WritebackError::Push {
            what: format!("the status commit to {}", self.source.branch),
            attempts: self.retry.attempts.max(1),
            last: flushed.refusals.pop().unwrap_or_default(),
        })
    }
}

fn status_message(projects: usize, revision: Option<&str>) -> String {
    let mut message = format!(
        "agentops: status of {projects} project{}\n\n",
        if projects == 1 { "" } else { "s" }
    );
    message.push_str(REVISION_TRAILER);
    message.push(' ');
    message.push_str(revision.unwrap_or("unknown"));
    message.push('\n');
    message
}

/// The result of a task to commit.
#[derive(Debug, Clone)]
pub struct ResultCommit {
    pub project: String,
    pub task: String,
    pub attempt: i64,
    pub agent: String,
    pub mode: OutputMode,
    /// `<branch>@sha1:<commit>` the task was dispatched at; the result branch starts there.
    pub dispatch_revision: Option<String>,
    pub files: Vec<OutputFile>,
}

/// Where a result landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedResult {
    pub branch: String,
    pub commit: Oid,
    /// The commit the result branch started from (for a pull request, its base).
    pub base: Oid,
}

/// `agentops/<project>/<task>`.
pub fn result_branch(project: &str, task: &str) -> String {
    format!("agentops/{project}/{task}")
}

/// The commit of a `<branch>@sha1:<commit>` revision.
pub fn revision_commit(revision: &str) -> Option<Oid> {
    revision
        .rsplit_once("@sha1:")
        .and_then(|(_, oid)| Oid::from_str(oid).ok())
}

/// Put `blob` at `path` (split into components) under `base`, refusing to pass through or
/// replace a symlink, or to treat a file as a directory.
fn insert_path(
    repo: &Repository,
    base: Option<&Tree<'_>>,
    components: &[&str],
    full: &str,
    blob: Oid,
    mode: i32,
) -> Result<Oid, WritebackError> {
    let (name, rest) = components.split_first().expect("a non-empty path");
    let existing = base
        .and_then(|t| t.get_name(name))
        .map(|e| (e.id(), e.filemode(), e.kind()));
    let link: i32 = FileMode::Link.into();
    let done: String = full
        .split('/')
        .take(components_len(full) - rest.len())
        .collect::<Vec<_>>()
        .join("/");
    if let Some((_, m, _)) = existing
        && m == link
    {
        return Err(if rest.is_empty() {
            PathError::Symlink {
                path: full.to_owned(),
            }
        } else {
            PathError::ThroughSymlink {
                path: full.to_owned(),
                link: done,
            }
        }
        .into());
    }
    let entry = if rest.is_empty() {
        (blob, mode)
    } else {
        let sub = match existing {
            Some((id, _, Some(git2::ObjectType::Tree))) => {
                Some(repo.find_tree(id).map_err(git("reading a tree"))?)
            }
            Some(_) => {
                return Err(PathError::NotADirectory {
                    path: full.to_owned(),
                    at: done,
                }
                .into());
            }
            None => None,
        };
        let id = insert_path(repo, sub.as_ref(), rest, full, blob, mode)?;
        (id, FileMode::Tree.into())
    };
    with_entry(repo, base, name, Some(entry))
}

fn components_len(path: &str) -> usize {
    path.split('/').count()
}

/// The tree of `base` with the files written in.
fn tree_with_files(
    repo: &Repository,
    base: &Tree<'_>,
    files: &[OutputFile],
) -> Result<Oid, WritebackError> {
    let mut tree = base.id();
    for f in files {
        let blob = repo
            .blob(&f.content)
            .map_err(git("storing an output file"))?;
        let mode: i32 = if f.executable {
            FileMode::BlobExecutable.into()
        } else {
            FileMode::Blob.into()
        };
        let current = repo.find_tree(tree).map_err(git("reading a tree"))?;
        let components: Vec<&str> = f.path.split('/').collect();
        tree = insert_path(repo, Some(&current), &components, &f.path, blob, mode)?;
    }
    Ok(tree)
}

fn result_message(req: &ResultCommit) -> String {
    format!(
        "{project}/{task}: output of attempt {attempt}\n\n\
         Committed by agentops for the agent {agent}.\n\n\
         Agentops-Task: {project}/{task}\nAgentops-Attempt: {attempt}\n",
        project = req.project,
        task = req.task,
        attempt = req.attempt,
        agent = req.agent,
    )
}

/// Commit a task's output files: on its result branch (from the revision it was dispatched
/// at, or on top of the branch's earlier attempts) or, with `output.mode: commit`, onto the
/// followed branch. Authored by the agent, committed by the controller, pushed without force.
pub fn commit_result(
    source: &GitSource,
    committer: &Author,
    retry: Retry,
    req: &ResultCommit,
) -> Result<CommittedResult, WritebackError> {
    let repo = source.open()?;
    let branch = match req.mode {
        OutputMode::PullRequest => result_branch(&req.project, &req.task),
        OutputMode::Commit => source.branch.clone(),
    };
    let author = Signature::now(&req.agent, &format!("{}@agents.agentops", req.agent))
        .map_err(git("making the agent's signature"))?;
    let committer = committer.signature()?;
    let message = result_message(req);
    let mut wait = retry.backoff;
    let mut last = String::new();
    for attempt in 0..retry.attempts.max(1) {
        if attempt > 0 {
            std::thread::sleep(wait);
            wait = Retry::next(wait);
        }
        let extra: Vec<&str> = match req.mode {
            OutputMode::PullRequest => vec![branch.as_str()],
            OutputMode::Commit => Vec::new(),
        };
        source.refresh(&repo, &extra)?;
        let head = source.head(&repo)?;
        let (parent, base) = match req.mode {
            OutputMode::Commit => (head, head),
            OutputMode::PullRequest => {
                let dispatched = req
                    .dispatch_revision
                    .as_deref()
                    .and_then(revision_commit)
                    .filter(|c| repo.find_commit(*c).is_ok())
                    .unwrap_or(head);
                let tip = branch_tip(&repo, source, &branch);
                (tip.unwrap_or(dispatched), dispatched)
            }
        };
        let parent_commit = repo
            .find_commit(parent)
            .map_err(git("reading the base commit"))?;
        let base_tree = parent_commit.tree().map_err(git("reading the base tree"))?;
        let tree = tree_with_files(&repo, &base_tree, &req.files)?;
        let tree = repo.find_tree(tree).map_err(git("reading a tree"))?;
        let commit = repo
            .commit(
                None,
                &author,
                &committer,
                &message,
                &tree,
                &[&parent_commit],
            )
            .map_err(git("committing the output"))?;
        let old = match req.mode {
            OutputMode::Commit => Some(head),
            OutputMode::PullRequest => branch_tip(&repo, source, &branch),
        };
        // Onto a checked-out branch of a local repository, the written files are brought into
        // its working tree as the status files are; a result branch is nobody's checkout.
        let written: Vec<String> = req.files.iter().map(|f| f.path.clone()).collect();
        let refresh = (req.mode == OutputMode::Commit).then_some(written.as_slice());
        match push(&repo, source, commit, &branch, old, refresh) {
            Ok(()) => {
                if req.mode == OutputMode::PullRequest
                    && !matches!(source.location, Location::Folder(_))
                {
                    let tracking = format!("refs/remotes/origin/{branch}");
                    repo.reference(&tracking, commit, true, "agentops: result pushed")
                        .map_err(git("recording the pushed branch"))?;
                }
                CommitPushed {
                    kind: CommitKind::Result,
                    branch: &branch,
                    commit,
                }
                .emit();
                return Ok(CommittedResult {
                    branch,
                    commit,
                    base,
                });
            }
            Err(failure) => {
                failure.refused(CommitKind::Result, &branch, attempt);
                last = failure.to_string();
            }
        }
    }
    Err(WritebackError::Push {
        what: format!("the output of {}/{} to {branch}", req.project, req.task),
        attempts: retry.attempts.max(1),
        last,
    })
}

/// The tip of `branch` as the mirror last saw it on the remote.
pub fn branch_tip(repo: &Repository, source: &GitSource, branch: &str) -> Option<Oid> {
    let name = match source.location {
        Location::Folder(_) => format!("refs/heads/{branch}"),
        _ => format!("refs/remotes/origin/{branch}"),
    };
    repo.find_reference(&name)
        .ok()
        .and_then(|r| r.peel_to_commit().ok())
        .map(|c| c.id())
}

/// Without a forge: what became of a result branch. Merged when its commit is in the followed
/// branch, or when its changes are (a squash or rebase merge, which leaves the commit itself
/// out); closed when the branch is gone from the remote without having been merged.
pub fn branch_state(
    source: &GitSource,
    branch: &str,
    commit: Option<&str>,
) -> Result<BranchState, WritebackError> {
    let repo = source.open()?;
    // Forget what we knew of the branch: a deleted branch is not fetched again, so a stale
    // tracking ref would keep it alive.
    if !matches!(source.location, Location::Folder(_))
        && let Ok(mut r) = repo.find_reference(&format!("refs/remotes/origin/{branch}"))
    {
        let _ = r.delete();
    }
    source.refresh(&repo, &[branch])?;
    let head = source.head(&repo)?;
    let tip = branch_tip(&repo, source, branch);
    let Some(commit) = commit.and_then(|c| Oid::from_str(c).ok()).or(tip) else {
        return Ok(BranchState::Closed);
    };
    let merged = head == commit
        || repo
            .graph_descendant_of(head, commit)
            .map_err(git("comparing the branch with the main branch"))?
        || changes_landed(&repo, head, commit)
            .map_err(git("comparing the branch's changes with the main branch"))?;
    Ok(if merged {
        BranchState::Merged
    } else if tip.is_some() {
        BranchState::Open
    } else {
        BranchState::Closed
    })
}

/// Whether every change `commit` made to its first parent is in `head`'s tree: each file it
/// wrote is there with the same content, each it deleted is gone. That is what a squash or a
/// rebase merge leaves. Otherwise a person who squash-merged a result and deleted its branch
/// would have the task retried, the work done twice. A commit that changed nothing is never
/// taken as landed: that branch waits for a person as before. Checked against the head only:
/// if the main branch changes those files again before the next review pass sees the squash,
/// deleting the branch still counts as a rejection.
fn changes_landed(repo: &Repository, head: Oid, commit: Oid) -> Result<bool, git2::Error> {
    let commit = repo.find_commit(commit)?;
    let parent_tree = match commit.parent(0) {
        Ok(parent) => Some(parent.tree()?),
        Err(_) => None,
    };
    let diff = repo.diff_tree_to_tree(parent_tree.as_ref(), Some(&commit.tree()?), None)?;
    if diff.deltas().len() == 0 {
        return Ok(false);
    }
    let head_tree = repo.find_commit(head)?.tree()?;
    for delta in diff.deltas() {
        let (file, wanted) = match delta.status() {
            git2::Delta::Deleted => (delta.old_file(), None),
            _ => {
                let new = delta.new_file();
                let wanted = Some((new.id(), i32::from(new.mode())));
                (new, wanted)
            }
        };
        let Some(path) = file.path() else {
            return Ok(false);
        };
        let at_head = head_tree
            .get_path(path)
            .ok()
            .map(|entry| (entry.id(), entry.filemode()));
        if at_head != wanted {
            return Ok(false);
        }
    }
    Ok(true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchState {
    Open,
    Merged,
    Closed,
}

/// Commit `files` on `branch` (a proposal: a new project, a tool), starting from the followed
/// branch's head or on top of the branch's earlier commits, and push it without force.
pub fn commit_proposal(
    source: &GitSource,
    committer: &Author,
    retry: Retry,
    branch: &str,
    message: &str,
    files: &[OutputFile],
) -> Result<CommittedResult, WritebackError> {
    let repo = source.open()?;
    let signature = committer.signature()?;
    let mut wait = retry.backoff;
    let mut last = String::new();
    for attempt in 0..retry.attempts.max(1) {
        if attempt > 0 {
            std::thread::sleep(wait);
            wait = Retry::next(wait);
        }
        source.refresh(&repo, &[branch])?;
        let head = source.head(&repo)?;
        let tip = branch_tip(&repo, source, branch);
        let parent = repo
            .find_commit(tip.unwrap_or(head))
            .map_err(git("reading the base commit"))?;
        let base_tree = parent.tree().map_err(git("reading the base tree"))?;
        let tree = tree_with_files(&repo, &base_tree, files)?;
        let tree = repo.find_tree(tree).map_err(git("reading a tree"))?;
        let commit = repo
            .commit(None, &signature, &signature, message, &tree, &[&parent])
            .map_err(git("committing the proposal"))?;
        match push(&repo, source, commit, branch, tip, None) {
            Ok(()) => {
                if !matches!(source.location, Location::Folder(_)) {
                    let tracking = format!("refs/remotes/origin/{branch}");
                    repo.reference(&tracking, commit, true, "agentops: proposal pushed")
                        .map_err(git("recording the pushed branch"))?;
                }
                CommitPushed {
                    kind: CommitKind::Proposal,
                    branch,
                    commit,
                }
                .emit();
                return Ok(CommittedResult {
                    branch: branch.to_owned(),
                    commit,
                    base: head,
                });
            }
            Err(failure) => {
                failure.refused(CommitKind::Proposal, branch, attempt);
                last = failure.to_string();
            }
        }
    }
    Err(WritebackError::Push {
        what: format!("the proposal {branch}"),
        attempts: retry.attempts.max(1),
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_carries_the_revision_trailer() {
        let m = status_message(2, Some("main@sha1:abc"));
        assert!(m.starts_with("agentops: status of 2 projects\n\n"));
        assert!(m.ends_with("\nAgentops-Revision: main@sha1:abc\n"));
    }

    #[test]
    fn revision_commit_reads_the_oid() {
        let oid = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            revision_commit(&format!("main@sha1:{oid}")),
            Some(Oid::from_str(oid).unwrap())
        );
        assert_eq!(revision_commit("main"), None);
    }

    #[test]
    fn insert_path_refuses_symlinks_and_files_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let target = repo.blob(b"elsewhere").unwrap();
        let file = repo.blob(b"text").unwrap();
        let mut builder = repo.treebuilder(None).unwrap();
        builder
            .insert("link", target, FileMode::Link.into())
            .unwrap();
        builder.insert("file", file, FileMode::Blob.into()).unwrap();
        let base = repo.find_tree(builder.write().unwrap()).unwrap();
        let blob = repo.blob(b"new").unwrap();
        let mode = FileMode::Blob.into();
        let err = |path: &str| {
            let parts: Vec<&str> = path.split('/').collect();
            match insert_path(&repo, Some(&base), &parts, path, blob, mode) {
                Err(WritebackError::Path(e)) => e,
                other => panic!("{path}: {other:?}"),
            }
        };
        assert!(matches!(err("link/x"), PathError::ThroughSymlink { link, .. } if link == "link"));
        assert!(matches!(err("link"), PathError::Symlink { .. }));
        assert!(matches!(err("file/x"), PathError::NotADirectory { at, .. } if at == "file"));
        let parts = ["new", "deep", "x.txt"];
        let tree = insert_path(&repo, Some(&base), &parts, "new/deep/x.txt", blob, mode).unwrap();
        let tree = repo.find_tree(tree).unwrap();
        assert_eq!(
            tree.get_path(Path::new("new/deep/x.txt")).unwrap().id(),
            blob
        );
        assert_eq!(tree.get_name("file").unwrap().id(), file);
    }
}
