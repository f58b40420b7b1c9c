//! The Git source: a bare mirror in the data directory, fetched from the configured remote,
//! read as trees and blobs.
//!
//! Everything here blocks (git2 does); callers run it on `spawn_blocking` and open the
//! repository inside the closure, so a `Repository` never crosses an `.await`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use git2::{
    Delta, DiffOptions, FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository, Tree,
    TreeWalkMode, TreeWalkResult,
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
}

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
        }
    }

    fn tracking_ref(&self) -> String {
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

    fn fetch_remote(&self, repo: &Repository) -> Result<(), SourceError> {
        let mut remote = repo
            .find_remote("origin")
            .map_err(|source| SourceError::Git {
                doing: "finding the remote",
                source,
            })?;
        let mut callbacks = RemoteCallbacks::new();
        if let Some(token) = &self.token {
            let token = token.clone();
            callbacks.credentials(move |_url, _user, _allowed| {
                git2::Cred::userpass_plaintext("x-access-token", &token)
            });
        }
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks);
        let refspec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", self.branch);
        remote
            .fetch(&[&refspec], Some(&mut options), None)
            .map_err(|source| SourceError::Fetch {
                url: self.location.url(),
                source,
            })
    }

    /// The revision the mirror currently has, without fetching.
    pub fn snapshot(&self, repo: &Repository) -> Result<Snapshot, SourceError> {
        let reference =
            repo.find_reference(&self.tracking_ref())
                .map_err(|_| SourceError::NoBranch {
                    url: self.location.url(),
                    branch: self.branch.clone(),
                })?;
        let commit = reference
            .peel_to_commit()
            .map_err(|source| SourceError::Git {
                doing: "reading the branch's commit",
                source,
            })?;
        let root = commit.tree().map_err(|source| SourceError::Git {
            doing: "reading the commit's tree",
            source,
        })?;
        let tree = if self.subpath.is_empty() {
            root.id()
        } else {
            let entry =
                root.get_path(Path::new(&self.subpath))
                    .map_err(|_| SourceError::NoPath {
                        path: self.subpath.clone(),
                        revision: commit.id().to_string(),
                    })?;
            if entry.kind() != Some(ObjectType::Tree) {
                return Err(SourceError::NoPath {
                    path: self.subpath.clone(),
                    revision: commit.id().to_string(),
                });
            }
            entry.id()
        };
        Ok(Snapshot {
            commit: commit.id(),
            tree,
            revision: format!("{}@sha1:{}", self.branch, commit.id()),
        })
    }
}

/// The spec files that differ between two trees; every spec file of `new` when there is no
/// `old`. Unchanged subtrees are skipped by id, so a revision that touches no spec costs a
/// walk of the changed directories only.
pub fn changes(
    repo: &Repository,
    old: Option<Oid>,
    new: Oid,
) -> Result<Vec<FileChange>, SourceError> {
    let git = |doing| move |source| SourceError::Git { doing, source };
    let new_tree = repo.find_tree(new).map_err(git("reading the new tree"))?;
    let Some(old) = old else {
        return all_files(&new_tree);
    };
    let old_tree = match repo.find_tree(old) {
        Ok(tree) => tree,
        // The last synced tree is gone (history rewritten, mirror re-created): start over.
        Err(_) => return all_files(&new_tree),
    };
    let mut options = DiffOptions::new();
    options.skip_binary_check(true);
    let diff = repo
        .diff_tree_to_tree(Some(&old_tree), Some(&new_tree), Some(&mut options))
        .map_err(git("comparing trees"))?;
    let mut out = Vec::new();
    for delta in diff.deltas() {
        let (old_file, new_file) = (delta.old_file(), delta.new_file());
        let path_of = |f: &git2::DiffFile| f.path().and_then(|p| p.to_str()).map(str::to_owned);
        match delta.status() {
            Delta::Deleted => {
                if let Some(path) = path_of(&old_file).filter(|p| is_spec_file(p)) {
                    out.push(FileChange { path, blob: None });
                }
            }
            Delta::Added | Delta::Modified | Delta::Typechange => {
                if let Some(path) = path_of(&new_file).filter(|p| is_spec_file(p)) {
                    let blob = (new_file.mode() != git2::FileMode::Link
                        && new_file.mode() != git2::FileMode::Commit)
                        .then(|| new_file.id());
                    out.push(FileChange { path, blob });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn all_files(tree: &Tree<'_>) -> Result<Vec<FileChange>, SourceError> {
    let mut out = Vec::new();
    tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(ObjectType::Blob)
            && entry.filemode() != i32::from(git2::FileMode::Link)
            && let Ok(name) = entry.name()
        {
            let path = format!("{dir}{name}");
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
    Ok(out)
}
