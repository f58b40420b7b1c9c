//! The Git source: a bare mirror in the data directory, fetched from the configured remote,
//! read as trees and blobs.
//!
//! Everything here blocks (git2 does); callers run it on `spawn_blocking` and open the
//! repository inside the closure, so a `Repository` never crosses an `.await`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use git2::{
    FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository, Tree, TreeWalkMode, TreeWalkResult,
};

use super::SourceError;

/// Where the specs come from, decided once from `--repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A URL git can fetch: `https://`, `ssh://`, `file://`, `git@host:…`.
    Remote(String),
    /// The top of a local Git repository, used like a remote.
    Local(PathBuf),
    /// A folder of specs that is not a repository: snapshotted into one in the data directory.
    Folder(PathBuf),
}

impl Location {
    pub fn resolve(repo: &str) -> Result<Location, SourceError> {
        if repo.contains("://") || (repo.contains('@') && repo.contains(':')) {
            return Ok(Location::Remote(repo.to_owned()));
        }
        let path = Path::new(repo);
        let path = path.canonicalize().map_err(|source| SourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        if !path.is_dir() {
            return Err(SourceError::NotADirectory(path));
        }
        let is_repo_top =
            path.join(".git").exists() || Repository::open_bare(&path).is_ok_and(|r| r.is_bare());
        Ok(if is_repo_top {
            Location::Local(path)
        } else {
            Location::Folder(path)
        })
    }

    /// The URL or path recorded in `sync_sources.url`.
    pub fn url(&self) -> String {
        match self {
            Location::Remote(url) => url.clone(),
            Location::Local(path) | Location::Folder(path) => path.display().to_string(),
        }
    }

    /// The local repository's Git directory, for watching its refs.
    pub fn local_git_dir(&self) -> Option<PathBuf> {
        match self {
            Location::Local(path) if path.join(".git").is_dir() => Some(path.join(".git")),
            Location::Local(path) => Some(path.clone()),
            _ => None,
        }
    }

    /// A remote given as a `file://` URL is local too: share its objects instead of copying.
    fn local_objects(&self) -> Option<PathBuf> {
        let path = match self {
            Location::Local(path) => path.clone(),
            Location::Remote(url) => PathBuf::from(url.strip_prefix("file://")?),
            Location::Folder(_) => return None,
        };
        [path.join(".git/objects"), path.join("objects")]
            .into_iter()
            .find(|p| p.is_dir())
    }
}

#[derive(Debug, Clone)]
pub struct GitSource {
    pub location: Location,
    pub branch: String,
    /// Sub-path of the repository holding the specs; empty for the root.
    pub subpath: String,
    /// The bare repository the controller reads (and later writes status) in.
    pub mirror: PathBuf,
    pub token: Option<String>,
    /// The last head whose own (status) commits were skipped, and the commit they led back
    /// to, so that a long run of them is walked once, not on every sync.
    own_commits: Arc<Mutex<Option<(Oid, Oid)>>>,
}

/// The trailer every status commit carries; with a change confined to `.agentops/`, it marks
/// a commit as the controller's own.
pub const REVISION_TRAILER: &str = "Agentops-Revision:";

/// How far back a run of the controller's own commits is followed before giving up (and
/// syncing the head as it is, which costs a cursor move, nothing more).
const OWN_COMMITS_MAX: usize = 10_000;

/// One revision of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub commit: Oid,
    /// The tree at `subpath`: what a sync compares.
    pub tree: Oid,
    /// `<branch>@sha1:<commit>`.
    pub revision: String,
}

/// A spec file that appeared, changed or (with `blob == None`) disappeared, relative to the
/// synced sub-path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub blob: Option<Oid>,
}

/// The controller's own files: never specs, whatever their extension.
pub const CONTROLLER_DIR: &str = ".agentops/";

pub fn is_spec_file(path: &str) -> bool {
    agentops_specs::is_spec_path(path) && !path.starts_with(CONTROLLER_DIR)
}

impl GitSource {
    pub fn new(
        location: Location,
        branch: &str,
        subpath: &str,
        data_dir: &Path,
        token: Option<String>,
    ) -> GitSource {
        let url = location.url();
        let mut hasher = DefaultHasher::new();
        url.hash(&mut hasher);
        let stem: String = url
            .rsplit(['/', ':'])
            .find(|s| !s.is_empty())
            .unwrap_or("repo")
            .trim_end_matches(".git")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        let kind = match location {
            Location::Folder(_) => "imports",
            _ => "mirrors",
        };
        let mirror = data_dir
            .join(kind)
            .join(format!("{stem}-{:016x}.git", hasher.finish()));
        GitSource {
            location,
            branch: branch.to_owned(),
            subpath: subpath.trim_matches('/').to_owned(),
            mirror,
            token,
            own_commits: Arc::default(),
        }
    }

    /// The ref the mirror keeps the followed branch in.
    pub fn tracking_ref(&self) -> String {
        match self.location {
            Location::Folder(_) => format!("refs/heads/{}", self.branch),
            _ => format!("refs/remotes/origin/{}", self.branch),
        }
    }

    /// Open the mirror, creating it on first use.
    pub fn open(&self) -> Result<Repository, SourceError> {
        let git = |source| SourceError::Git {
            doing: "opening the mirror repository",
            source,
        };
        if let Ok(repo) = Repository::open_bare(&self.mirror) {
            return Ok(repo);
        }
        std::fs::create_dir_all(&self.mirror).map_err(|source| SourceError::Io {
            path: self.mirror.clone(),
            source,
        })?;
        let repo = Repository::init_bare(&self.mirror).map_err(git)?;
        if !matches!(self.location, Location::Folder(_)) {
            repo.remote("origin", &self.location.url()).map_err(git)?;
        }
        // `git clone --shared`: a local remote's objects are read in place, so a mirror of a
        // large local repository costs no copy and a fetch moves only refs.
        if let Some(objects) = self.location.local_objects() {
            let info = self.mirror.join("objects/info");
            std::fs::create_dir_all(&info)
                .and_then(|()| {
                    std::fs::write(info.join("alternates"), format!("{}\n", objects.display()))
                })
                .map_err(|source| SourceError::Io { path: info, source })?;
        }
        Ok(repo)
    }

    /// Bring the mirror up to date with the remote (or re-snapshot the folder) and return the
    /// branch's current revision.
    pub fn fetch(&self, repo: &Repository) -> Result<Snapshot, SourceError> {
        match &self.location {
            Location::Folder(folder) => {
                super::import::snapshot(repo, folder, &self.branch)?;
            }
            _ => self.fetch_remote(repo)?,
        }
        self.snapshot(repo)
    }

    /// Fetch the followed branch (and `extra` branches, which may not exist) without
    /// reading anything. A folder has no remote: its import branch is the truth.
    pub fn refresh(&self, repo: &Repository, extra: &[&str]) -> Result<(), SourceError> {
        if matches!(self.location, Location::Folder(_)) {
            return Ok(());
        }
        self.fetch_refspecs(repo, self.branch_refspecs(extra))
    }

    fn branch_refspecs(&self, extra: &[&str]) -> Vec<String> {
        std::iter::once(self.branch.as_str())
            .chain(extra.iter().copied())
            .map(|b| format!("+refs/heads/{b}:refs/remotes/origin/{b}"))
            .collect()
    }

    /// Credentials for `https://` remotes, for fetches and pushes alike.
    pub fn callbacks(&self) -> RemoteCallbacks<'static> {
        let mut callbacks = RemoteCallbacks::new();
        if let Some(token) = &self.token {
            let token = token.clone();
            callbacks.credentials(move |_url, _user, _allowed| {
                git2::Cred::userpass_plaintext("x-access-token", &token)
            });
        }
        callbacks
    }

    fn fetch_refspecs(&self, repo: &Repository, refspecs: Vec<String>) -> Result<(), SourceError> {
        let mut remote = repo
            .find_remote("origin")
            .map_err(|source| SourceError::Git {
                doing: "finding the remote",
                source,
            })?;
        let mut options = FetchOptions::new();
        options.remote_callbacks(self.callbacks());
        // A result branch that does not exist yet is not an error: fetch what there is. Each
        // refspec goes alone so that a missing one does not hide the others.
        let mut first_error = None;
        for (i, refspec) in refspecs.iter().enumerate() {
            if let Err(source) = remote.fetch(&[refspec], Some(&mut options), None)
                && i == 0
            {
                first_error = Some(source);
            }
        }
        match first_error {
            Some(source) => Err(SourceError::Fetch {
                url: self.location.url(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// The commit the mirror has for the followed branch, own commits included.
    pub fn head(&self, repo: &Repository) -> Result<Oid, SourceError> {
        repo.find_reference(&self.tracking_ref())
            .and_then(|r| r.peel_to_commit())
            .map(|c| c.id())
            .map_err(|_| SourceError::NoBranch {
                url: self.location.url(),
                branch: self.branch.clone(),
            })
    }

    /// The newest commit at or below `head` that is not one of the controller's own status
    /// commits: what the specs are synced at. Own commits change only `.agentops/`, so
    /// skipping them changes no spec, and a status commit costs the store nothing.
    pub fn spec_commit<'r>(
        &self,
        repo: &'r Repository,
        head: git2::Commit<'r>,
    ) -> Result<git2::Commit<'r>, SourceError> {
        let memo = *self.own_commits.lock().expect("own commits lock");
        let mut commit = head.clone();
        for _ in 0..OWN_COMMITS_MAX {
            if let Some((memo_head, memo_spec)) = memo
                && commit.id() == memo_head
            {
                commit = repo
                    .find_commit(memo_spec)
                    .map_err(|source| SourceError::Git {
                        doing: "reading a commit",
                        source,
                    })?;
                break;
            }
            if !is_own_commit(repo, &commit) {
                break;
            }
            commit = commit.parent(0).map_err(|source| SourceError::Git {
                doing: "reading a commit's parent",
                source,
            })?;
        }
        if commit.id() != head.id() && is_own_commit(repo, &commit) {
            // Gave up on a very long run: sync the head itself.
            commit = head.clone();
        }
        *self.own_commits.lock().expect("own commits lock") = Some((head.id(), commit.id()));
        Ok(commit)
    }

    /// Fetch what `revision` may name on the remote (a branch, a tag, a full ref or a commit
    /// id) besides the followed branch, so that [`GitSource::resolve`] finds it. A revision
    /// the remote does not have is not an error here: resolving it is.
    pub fn fetch_revision(&self, repo: &Repository, revision: &str) -> Result<(), SourceError> {
        if matches!(self.location, Location::Folder(_)) {
            return Ok(());
        }
        let mut refspecs = self.branch_refspecs(&[]);
        if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
            refspecs.push(format!("+{revision}:refs/fetched/{revision}"));
        } else if let Some(name) = revision.strip_prefix("refs/") {
            refspecs.push(format!("+{revision}:refs/fetched/{name}"));
        } else {
            refspecs.extend(self.branch_refspecs(&[revision]).into_iter().skip(1));
            refspecs.push(format!(
                "+refs/tags/{revision}:refs/fetched/tags/{revision}"
            ));
        }
        self.fetch_refspecs(repo, refspecs)
    }

    /// The commit `revision` names in the mirror, trying the remote's branches first.
    pub fn resolve<'r>(
        &self,
        repo: &'r Repository,
        revision: &str,
    ) -> Result<git2::Commit<'r>, SourceError> {
        let candidates = [
            format!("refs/remotes/origin/{revision}"),
            format!("refs/fetched/{revision}"),
            format!("refs/fetched/tags/{revision}"),
            revision.strip_prefix("refs/").map_or_else(
                || revision.to_owned(),
                |name| format!("refs/fetched/{name}"),
            ),
            revision.to_owned(),
        ];
        candidates
            .iter()
            .find_map(|spec| repo.revparse_single(spec).ok()?.peel_to_commit().ok())
            .ok_or_else(|| SourceError::NoRevision {
                url: self.location.url(),
                revision: revision.to_owned(),
            })
    }

    /// The tree at `subpath` of `commit`.
    pub fn tree_at(&self, commit: &git2::Commit<'_>) -> Result<Oid, SourceError> {
        let root = commit.tree().map_err(|source| SourceError::Git {
            doing: "reading the commit's tree",
            source,
        })?;
        if self.subpath.is_empty() {
            return Ok(root.id());
        }
        let no_path = || SourceError::NoPath {
            path: self.subpath.clone(),
            revision: commit.id().to_string(),
        };
        let entry = root
            .get_path(Path::new(&self.subpath))
            .map_err(|_| no_path())?;
        if entry.kind() != Some(ObjectType::Tree) {
            return Err(no_path());
        }
        Ok(entry.id())
    }

    fn fetch_remote(&self, repo: &Repository) -> Result<(), SourceError> {
        self.fetch_refspecs(repo, self.branch_refspecs(&[]))
    }

    /// The revision the mirror currently has, without fetching.
    pub fn snapshot(&self, repo: &Repository) -> Result<Snapshot, SourceError> {
        let reference =
            repo.find_reference(&self.tracking_ref())
                .map_err(|_| SourceError::NoBranch {
                    url: self.location.url(),
                    branch: self.branch.clone(),
                })?;
        let head = reference
            .peel_to_commit()
            .map_err(|source| SourceError::Git {
                doing: "reading the branch's commit",
                source,
            })?;
        let commit = self.spec_commit(repo, head)?;
        let tree = self.tree_at(&commit)?;
        Ok(Snapshot {
            commit: commit.id(),
            tree,
            revision: format!("{}@sha1:{}", self.branch, commit.id()),
        })
    }
}

/// A status commit of the controller: one parent, the revision trailer, and no change outside
/// `.agentops/`. The trailer alone is not trusted, so a person's commit that quotes it still
/// syncs.
pub fn is_own_commit(repo: &Repository, commit: &git2::Commit<'_>) -> bool {
    if commit.parent_count() != 1
        || !commit
            .message_raw()
            .is_ok_and(|m| m.lines().any(|l| l.starts_with(REVISION_TRAILER)))
    {
        return false;
    }
    let (Ok(parent), Ok(tree)) = (commit.parent(0), commit.tree()) else {
        return false;
    };
    let Ok(parent_tree) = parent.tree() else {
        return false;
    };
    let _ = repo;
    let outside = |t: &Tree<'_>| -> Vec<(Vec<u8>, Oid, i32)> {
        t.iter()
            .filter(|e| e.name_bytes() != b".agentops")
            .map(|e| (e.name_bytes().to_vec(), e.id(), e.filemode()))
            .collect()
    };
    outside(&tree) == outside(&parent_tree)
}

/// The spec files that differ between two trees; every spec file of `new` when there is no
/// `old`. Only subtrees whose ids differ are entered, so a revision that touches no spec
/// costs a comparison of the changed directories, not a walk of the repository (libgit2's
/// own tree diff visits every entry of both trees).
pub fn changes(
    repo: &Repository,
    old: Option<Oid>,
    new: Oid,
) -> Result<Vec<FileChange>, SourceError> {
    let new_tree = repo
        .find_tree(new)
        .map_err(git_error("reading the new tree"))?;
    let mut out = Vec::new();
    match old.and_then(|old| repo.find_tree(old).ok()) {
        Some(old_tree) => diff_trees(repo, &old_tree, &new_tree, "", &mut out)?,
        // No previous tree, or it is gone (history rewritten, mirror re-created): start over.
        None => all_files(&new_tree, "", &mut out)?,
    }
    Ok(out)
}

fn git_error(doing: &'static str) -> impl Fn(git2::Error) -> SourceError {
    move |source| SourceError::Git { doing, source }
}

/// What a tree entry is to the sync: a file that may be a spec, a directory, or neither
/// (symlinks and submodules are never specs).
#[derive(Clone, Copy, PartialEq)]
enum Entry {
    File(Oid),
    Dir(Oid),
}

fn entries(tree: &Tree<'_>) -> std::collections::BTreeMap<String, Entry> {
    tree.iter()
        .filter_map(|e| {
            let name = e.name().ok()?.to_owned();
            let entry = match e.kind()? {
                ObjectType::Tree => Entry::Dir(e.id()),
                ObjectType::Blob if e.filemode() != i32::from(git2::FileMode::Link) => {
                    Entry::File(e.id())
                }
                _ => return None,
            };
            Some((name, entry))
        })
        .collect()
}

fn diff_trees(
    repo: &Repository,
    old: &Tree<'_>,
    new: &Tree<'_>,
    prefix: &str,
    out: &mut Vec<FileChange>,
) -> Result<(), SourceError> {
    let (old, new) = (entries(old), entries(new));
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let path = format!("{prefix}{name}");
        let (before, after) = (old.get(name).copied(), new.get(name).copied());
        if before == after {
            continue;
        }
        match before {
            Some(Entry::File(_))
                if !matches!(after, Some(Entry::File(_))) && is_spec_file(&path) =>
            {
                out.push(FileChange {
                    path: path.clone(),
                    blob: None,
                });
            }
            Some(Entry::Dir(id)) if !matches!(after, Some(Entry::Dir(_))) => {
                let tree = repo.find_tree(id).map_err(git_error("reading a tree"))?;
                let mut gone = Vec::new();
                all_files(&tree, &format!("{path}/"), &mut gone)?;
                out.extend(gone.into_iter().map(|c| FileChange {
                    path: c.path,
                    blob: None,
                }));
            }
            _ => {}
        }
        match (before, after) {
            (Some(Entry::Dir(a)), Some(Entry::Dir(b))) => {
                let a = repo.find_tree(a).map_err(git_error("reading a tree"))?;
                let b = repo.find_tree(b).map_err(git_error("reading a tree"))?;
                diff_trees(repo, &a, &b, &format!("{path}/"), out)?;
            }
            (_, Some(Entry::Dir(id))) => {
                let tree = repo.find_tree(id).map_err(git_error("reading a tree"))?;
                all_files(&tree, &format!("{path}/"), out)?;
            }
            (_, Some(Entry::File(id))) => {
                if is_spec_file(&path) {
                    out.push(FileChange {
                        path,
                        blob: Some(id),
                    });
                }
            }
            (_, None) => {}
        }
    }
    Ok(())
}

fn all_files(tree: &Tree<'_>, prefix: &str, out: &mut Vec<FileChange>) -> Result<(), SourceError> {
    tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(ObjectType::Blob)
            && entry.filemode() != i32::from(git2::FileMode::Link)
            && let Ok(name) = entry.name()
        {
            let path = format!("{prefix}{dir}{name}");
            if is_spec_file(&path) {
                out.push(FileChange {
                    path,
                    blob: Some(entry.id()),
                });
            }
        }
        TreeWalkResult::Ok
    })
    .map_err(|source| SourceError::Git {
        doing: "listing the tree",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a tree from `path => content` pairs.
    fn tree(repo: &Repository, files: &[(&str, &str)]) -> Oid {
        let mut index = git2::Index::new().unwrap();
        for (path, content) in files {
            let blob = repo.blob(content.as_bytes()).unwrap();
            let entry = git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode: 0o100644,
                uid: 0,
                gid: 0,
                file_size: 0,
                id: blob,
                flags: path.len() as u16,
                flags_extended: 0,
                path: path.as_bytes().to_vec(),
            };
            index.add(&entry).unwrap();
        }
        index.write_tree_to(repo).unwrap()
    }

    fn sorted(mut changes: Vec<FileChange>) -> Vec<(String, bool)> {
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        changes
            .into_iter()
            .map(|c| (c.path, c.blob.is_some()))
            .collect()
    }

    #[test]
    fn diff_enters_only_changed_directories_and_handles_type_changes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let old = tree(
            &repo,
            &[
                ("README.md", "a"),
                ("a/x.yaml", "1"),
                ("a/y.yaml", "2"),
                ("b.yaml", "file"),
                ("c/z.yaml", "3"),
                (".agentops/status/a.yaml", "s"),
            ],
        );
        let new = tree(
            &repo,
            &[
                ("README.md", "b"),
                ("a/x.yaml", "1"),
                ("a/y.yaml", "changed"),
                ("b.yaml/inner.yaml", "now a dir"),
                ("c", "now a file"),
                ("d/new.yml", "4"),
                (".agentops/status/a.yaml", "t"),
            ],
        );
        assert_eq!(
            sorted(changes(&repo, Some(old), new).unwrap()),
            [
                ("a/y.yaml".to_owned(), true),
                ("b.yaml".to_owned(), false),
                ("b.yaml/inner.yaml".to_owned(), true),
                ("c/z.yaml".to_owned(), false),
                ("d/new.yml".to_owned(), true),
            ]
        );
        assert_eq!(changes(&repo, Some(new), new).unwrap(), []);
        assert_eq!(changes(&repo, None, new).unwrap().len(), 4);
    }
}
