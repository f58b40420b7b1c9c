//! The sync loop's one step: fetch the source, read what changed, decide (`plan`), apply.
//!
//! The syncer keeps two things in memory between steps: an index of the parsed spec files (so
//! a new revision parses only the files whose blobs changed) and the store's current view (so
//! deciding needs no query). Both are dropped after a failed apply and rebuilt on the next
//! step, which makes a failure cost one full pass, never a missed change.
//!
//! The index keeps a skeleton of each object (its key, dependencies and the positions
//! validation reports at), not the object: about a fifth of the memory, which is what keeps a
//! sync of 100,000 tasks within 200 MB. Deciding needs no more; the objects a plan writes are
//! read and parsed again from their blobs, batch by batch, while the store writes the batch
//! before.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentops_specs::{Diagnostic, Object, ObjectKey, Pos, parse_file};
use futures::future::BoxFuture;
use git2::{Oid, Repository};

use super::claims::Claims;
use super::decide::{Change, Index, Touched, decide_touched, decide_with, record};
use super::plan::{self, Current, SpecHash, Write};
use crate::source::SourceError;
use crate::source::git::{self, FileChange, GitSource, Snapshot};
use crate::store::{Objects, SourceInfo, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one step did, for logs, `reconcile --once` and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncReport {
    pub revision: String,
    /// Spec files read and parsed in this step.
    pub files_parsed: usize,
    /// Rows created, updated, pruned or flagged.
    pub object_writes: usize,
    pub events: usize,
    pub cursor_moved: bool,
    /// Every problem in the source at this revision.
    pub diagnostics: Vec<Diagnostic>,
    /// Where the time went: fetching and parsing, deciding, writing.
    pub read: Duration,
    pub decide: Duration,
    pub apply: Duration,
}

/// Show a long sync's progress: in place on a terminal, as a log line every few seconds
/// otherwise.
struct Progress {
    total: usize,
    done: usize,
    last: Instant,
    started: Instant,
    terminal: bool,
}

const PROGRESS_FROM: usize = 2_000;

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            last: Instant::now(),
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        if self.total < PROGRESS_FROM {
            return;
        }
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.print();
        }
    }

    fn print(&self) {
        let line = format!("syncing: {}/{} files", self.done, self.total);
        if self.terminal {
            eprint!("\r{line}");
        } else {
            tracing::info!("{line}");
        }
    }

    fn finish(&self) {
        if self.total >= PROGRESS_FROM {
            if self.terminal {
                eprintln!(
                    "\rsynced: {}/{} files in {:.1} s",
                    self.done,
                    self.total,
                    self.started.elapsed().as_secs_f64()
                );
            } else {
                self.print();
            }
        }
    }
}

impl Index {
    /// Read and parse the changed files. Parsing runs on every core while this thread reads
    /// blobs, since a cold sync of a large repository is mostly parsing. Returns the files
    /// that were parsed or removed, each with its shape before the change (`None` for a file
    /// that was not in the index).
    fn apply(
        &mut self,
        repo: &Repository,
        changes: Vec<FileChange>,
    ) -> Result<Vec<Touched>, SourceError> {
        let mut progress = Progress::new(changes.len());
        let mut to_parse = Vec::new();
        let mut touched = Vec::new();
        for change in changes {
            match self.change(change.path, change.blob) {
                Change::Unchanged => progress.tick(),
                Change::Removed(gone) => {
                    touched.push(gone);
                    progress.tick();
                }
                Change::Parse(path, blob, before) => {
                    touched.push(before);
                    to_parse.push((path, blob));
                }
            }
        }
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(Arc<str>, Oid, Vec<u8>)>(256);
        let work_rx = std::sync::Mutex::new(work_rx);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(256);
        let files = &mut self.files;
        std::thread::scope(|scope| -> Result<(), SourceError> {
            for _ in 0..workers {
                let done_tx = done_tx.clone();
                let work_rx = &work_rx;
                scope.spawn(move || {
                    loop {
                        let item = work_rx.lock().map(|rx| rx.recv());
                        let Ok(Ok((path, blob, bytes))) = item else {
                            break;
                        };
                        let parsed = parse_file(&path, &bytes);
                        let objects: Vec<(Object, SpecHash)> = parsed
                            .objects
                            .into_iter()
                            .map(|o| {
                                let hash = SpecHash::of(&o);
                                (o, hash)
                            })
                            .collect();
                        let _ = done_tx.send((path, blob, objects, parsed.errors));
                    }
                });
            }
            drop(done_tx);
            let collector = scope.spawn(move || {
                for (path, blob, objects, errors) in done_rx {
                    // The skeletons, which the index keeps, are made on this one thread: made
                    // by the workers, each would sit in its worker's heap among the garbage of
                    // parsing, which then could not be given back.
                    let objects = objects
                        .iter()
                        .map(|(o, hash)| (o.skeleton(Arc::clone(&path)), *hash))
                        .collect();
                    record(files, path, blob, objects, errors);
                    progress.tick();
                }
                progress.finish();
            });
            // git2's Repository is not Sync, so this thread does all the reading.
            let read = to_parse.into_iter().try_for_each(|(path, blob)| {
                let bytes = repo
                    .find_blob(blob)
                    .map_err(|source| SourceError::Git {
                        doing: "reading a spec file",
                        source,
                    })?
                    .content()
                    .to_vec();
                // The workers only stop when this sender is dropped.
                let _ = work_tx.send((path, blob, bytes));
                Ok(())
            });
            drop(work_tx);
            let _ = collector.join();
            read
        })?;
        Ok(touched)
    }
}

impl Index {
    /// Every spec file of `tree`, parsed.
    pub(super) fn of_tree(repo: &Repository, tree: Oid) -> Result<Index, SourceError> {
        let mut index = Index::default();
        index.apply(repo, git::changes(repo, None, tree)?)?;
        index.tree = Some(tree);
        Ok(index)
    }

    /// Where the objects `writes` declare are, to read them again with [`reread_in`].
    pub(super) fn locate(&self, writes: &[&Write<'_>]) -> Vec<(Arc<str>, Oid, Pos)> {
        // A write's skeleton lives in its file's index entry, so the entry is there.
        writes
            .iter()
            .map(|w| {
                let path = &w.object.path;
                (path.clone(), self.files[path].blob, w.object.document)
            })
            .collect()
    }
}

/// Reads the objects a plan writes again, from their files' blobs: the index keeps only
/// their skeletons.
struct Reread<'i> {
    index: &'i Index,
    source: &'i GitSource,
}

impl Objects for Reread<'_> {
    fn fetch(&self, writes: &[&Write<'_>]) -> BoxFuture<'static, Result<Vec<Object>, StoreError>> {
        let wanted = self.index.locate(writes);
        let source = self.source.clone();
        let read = tokio::task::spawn_blocking(move || reread(&source, wanted));
        Box::pin(async move {
            read.await
                .map_err(|e| StoreError::Objects(e.into()))?
                .map_err(StoreError::Objects)
        })
    }
}

/// The objects declared at `(path, blob, document)`, in order. The writes of one file come
/// one after the other, so each file is parsed once.
fn reread(
    source: &GitSource,
    wanted: Vec<(Arc<str>, Oid, Pos)>,
) -> Result<Vec<Object>, Box<dyn std::error::Error + Send + Sync>> {
    reread_in(&source.open()?, wanted)
}

/// [`reread`] in a repository already open.
pub(super) fn reread_in(
    repo: &Repository,
    wanted: Vec<(Arc<str>, Oid, Pos)>,
) -> Result<Vec<Object>, Box<dyn std::error::Error + Send + Sync>> {
    let mut file: Option<(Oid, Vec<Option<Object>>)> = None;
    let mut objects = Vec::with_capacity(wanted.len());
    for (path, blob, document) in wanted {
        if file.as_ref().is_none_or(|(b, _)| *b != blob) {
            let bytes = repo.find_blob(blob).map_err(|source| SourceError::Git {
                doing: "reading a spec file again to write it",
                source,
            })?;
            let parsed = parse_file(&path, bytes.content());
            file = Some((blob, parsed.objects.into_iter().map(Some).collect()));
        }
        let (_, parsed) = file.as_mut().expect("parsed above");
        let object = parsed
            .iter_mut()
            .find(|o| o.as_ref().is_some_and(|o| o.origin.document == document))
            .and_then(Option::take)
            .ok_or_else(|| {
                format!(
                    "{path}:{}:{}: the object is not there when its blob is read again",
                    document.line, document.column
                )
            })?;
        objects.push(object);
    }
    Ok(objects)
}

pub struct Syncer<S> {
    source: GitSource,
    info: SourceInfo,
    store: S,
    index: Option<Index>,
    current: Option<Current>,
    /// Objects the last full decision found invalid.
    invalid: HashSet<ObjectKey>,
    /// With other sources in the same controller: who declares what, and the version of it
    /// the last decision saw.
    claims: Option<(Claims, u64)>,
}

impl<S: Store> Syncer<S> {
    pub fn new(source: GitSource, source_name: &str, store: S) -> Syncer<S> {
        let info = SourceInfo {
            name: source_name.to_owned(),
            url: source.location.url(),
            branch: source.branch.clone(),
            path: source.subpath.clone(),
        };
        Syncer {
            source,
            info,
            store,
            index: None,
            current: None,
            invalid: HashSet::new(),
            claims: None,
        }
    }

    /// Decide alongside other sources: an object another source declares too is refused.
    pub fn with_claims(mut self, claims: Claims) -> Syncer<S> {
        self.claims = Some((claims, u64::MAX));
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn source(&self) -> &GitSource {
        &self.source
    }

    /// Fetch, read what changed, decide and apply. Returns what it did.
    pub async fn sync(&mut self) -> Result<SyncReport, SyncError> {
        let result = self.step().await;
        if result.is_err() {
            // Whether the store took the last writes is unknown: start the next step afresh.
            self.index = None;
            self.current = None;
        }
        result
    }

    async fn step(&mut self) -> Result<SyncReport, SyncError> {
        if self.current.is_none() {
            self.current = Some(self.store.load(&self.info.name).await?);
        }
        let started = Instant::now();
        let warm = self.index.is_some();
        let mut index = self.index.take().unwrap_or_default();
        let source = self.source.clone();
        let (index, snapshot, touched) = tokio::task::spawn_blocking(
            move || -> Result<(Index, Snapshot, Vec<Touched>), SourceError> {
                let t0 = Instant::now();
                let repo = source.open()?;
                let snapshot = source.fetch(&repo)?;
                tracing::debug!(ms = t0.elapsed().as_millis() as u64, "fetched");
                let mut touched = Vec::new();
                if index.tree != Some(snapshot.tree) {
                    let changes = git::changes(&repo, index.tree, snapshot.tree)?;
                    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "diffed");
                    touched = index.apply(&repo, changes)?;
                    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "parsed");
                    index.tree = Some(snapshot.tree);
                }
                Ok((index, snapshot, touched))
            },
        )
        .await
        .map_err(SourceError::Worker)??;
        let index = self.index.insert(index);
        let current = self.current.as_mut().expect("loaded above");

        let tree = snapshot.tree.to_string();
        let files_parsed = touched
            .iter()
            .filter(|t| index.files.contains_key(&t.path))
            .count();
        let reread = Reread {
            index,
            source: &self.source,
        };
        let mut report = SyncReport {
            revision: snapshot.revision.clone(),
            files_parsed,
            read: started.elapsed(),
            ..SyncReport::default()
        };

        let claims_read = self.claims.as_ref().map(|(c, seen)| (c.version(), *seen));
        let claims_moved = claims_read.is_some_and(|(now, seen)| now != seen);
        let conflicts = self
            .claims
            .as_ref()
            .map(|(c, _)| c.others(&self.info.name))
            .unwrap_or_default();

        if warm && touched.is_empty() && !claims_moved {
            // No spec file changed or went away since the last step, which the store already
            // reflects: at most the cursor moves.
            if let Some(cursor) = current
                .cursor
                .as_ref()
                .filter(|c| c.revision != snapshot.revision)
            {
                let mut cursor = cursor.clone();
                cursor.revision = snapshot.revision.clone();
                cursor.tree = tree;
                report.diagnostics = cursor.errors.clone();
                let plan = plan::Plan {
                    revision: snapshot.revision.clone(),
                    cursor: Some(cursor),
                    ..plan::Plan::default()
                };
                self.store.apply(&self.info, &plan, &reread).await?;
                plan::apply_to_current(current, plan);
                report.cursor_moved = true;
            } else if let Some(cursor) = &current.cursor {
                report.diagnostics = cursor.errors.clone();
            }
            return Ok(report);
        }

        let started = Instant::now();
        let desired_plan = match (warm && !claims_moved)
            .then(|| {
                decide_touched(
                    index,
                    &touched,
                    &self.invalid,
                    &conflicts,
                    current,
                    &snapshot.revision,
                    &tree,
                )
            })
            .flatten()
        {
            Some(plan) => plan,
            None => {
                let (plan, invalid) =
                    decide_with(index, current, &snapshot.revision, &tree, &conflicts);
                self.invalid = invalid;
                plan
            }
        };
        report.decide = started.elapsed();
        // A cold sync touched every file: make room for what applying holds.
        drop(touched);

        let started = Instant::now();
        self.store.apply(&self.info, &desired_plan, &reread).await?;
        report.apply = started.elapsed();
        report.object_writes = desired_plan.object_writes();
        report.events = desired_plan.events.len();
        report.cursor_moved = desired_plan.cursor.is_some();
        plan::apply_to_current(current, desired_plan);
        report.diagnostics = current
            .cursor
            .as_ref()
            .map(|c| c.errors.clone())
            .unwrap_or_default();
        if let (Some((claims, seen)), Some((read, _))) = (self.claims.as_mut(), claims_read) {
            *seen = declare(claims, &self.info.name, index, read);
        }
        Ok(report)
    }
}

/// Declare what `index` holds for `source`, and return the claims version its decision is
/// up to date with: `read` (what it decided against), or one more when only this declaration
/// moved it since.
pub(super) fn declare(claims: &Claims, source: &str, index: &Index, read: u64) -> u64 {
    if claims.declare(source, index.declared_keys()) && claims.version() == read + 1 {
        read + 1
    } else {
        read
    }
}
