//! Real Git repositories in temporary directories: working repositories and bare remotes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{Repository, RepositoryInitOptions, Signature};
use tempfile::TempDir;

pub const BRANCH: &str = "main";

/// A non-bare repository in a temporary directory, on branch `main`.
pub struct GitRepo {
    pub dir: TempDir,
    repo: Repository,
}

impl Default for GitRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl GitRepo {
    pub fn new() -> GitRepo {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = Repository::init_opts(
            dir.path(),
            RepositoryInitOptions::new().initial_head(BRANCH),
        )
        .expect("git init");
        GitRepo { dir, repo }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write (`Some`) or delete (`None`) files, relative to the top, and commit them all.
    /// Returns the revision as the controller spells it.
    pub fn commit(&self, message: &str, changes: &[(&str, Option<&str>)]) -> String {
        let mut index = self.repo.index().expect("index");
        for (path, content) in changes {
            let full = self.path().join(path);
            match content {
                Some(content) => {
                    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                    std::fs::write(&full, content).unwrap();
                    index.add_path(Path::new(path)).expect("git add");
                }
                None => {
                    std::fs::remove_file(&full).unwrap_or_else(|e| panic!("rm {path}: {e}"));
                    index.remove_path(Path::new(path)).expect("git rm");
                }
            }
        }
        index.write().expect("write index");
        let tree = self
            .repo
            .find_tree(index.write_tree().expect("write tree"))
            .unwrap();
        let signature = Signature::now("Test", "test@example.com").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        let oid = self
            .repo
            .commit(
                Some("HEAD"),
                &signature,
                &signature,
                message,
                &tree,
                &parents,
            )
            .expect("git commit");
        format!("{BRANCH}@sha1:{oid}")
    }

    /// `git mv` with the content unchanged, committed.
    pub fn rename(&self, from: &str, to: &str) -> String {
        let content = std::fs::read_to_string(self.path().join(from)).unwrap();
        self.commit(
            &format!("mv {from} {to}"),
            &[(from, None), (to, Some(&content))],
        )
    }
}

/// A bare repository in a temporary directory: the remote clones push to and controllers
/// fetch from.
pub struct BareRemote {
    _dir: TempDir,
    pub path: PathBuf,
}

impl Default for BareRemote {
    fn default() -> Self {
        Self::new()
    }
}

impl BareRemote {
    pub fn new() -> BareRemote {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("remote.git");
        Repository::init_opts(
            &path,
            RepositoryInitOptions::new().bare(true).initial_head(BRANCH),
        )
        .expect("git init --bare");
        BareRemote { _dir: dir, path }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Every ref with its target: what a test compares to show nothing was pushed.
    pub fn refs(&self) -> BTreeMap<String, String> {
        let repo = Repository::open_bare(&self.path).expect("open the remote");
        let refs = repo.references().expect("list refs");
        refs.filter_map(Result::ok)
            .filter_map(|r| Some((r.name().ok()?.to_owned(), r.target()?.to_string())))
            .collect()
    }
}

impl GitRepo {
    /// `git push <remote> <local>:<branch>` (forced), as a person publishing a branch; a
    /// `branch` starting with `refs/` is pushed as that ref (such as a forge's
    /// `refs/pull/7/head`).
    pub fn push(&self, remote: &BareRemote, local: &str, branch: &str) {
        let target = if branch.starts_with("refs/") {
            branch.to_owned()
        } else {
            format!("refs/heads/{branch}")
        };
        let mut origin = self.repo.remote_anonymous(&remote.url()).expect("remote");
        origin
            .push(&[format!("+{local}:{target}")], None)
            .expect("git push");
    }

    /// `git checkout -b <branch>` at the current commit, files unchanged.
    pub fn branch(&self, branch: &str) {
        let head = self.repo.head().unwrap().peel_to_commit().unwrap();
        self.repo.branch(branch, &head, true).expect("git branch");
        self.repo
            .set_head(&format!("refs/heads/{branch}"))
            .expect("git checkout");
    }
}

/// `git ARGS` in `dir` as a person would run it (author and committer `person`); its stdout.
/// Fails the test, with git's stderr, when git fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "person")
        .env("GIT_AUTHOR_EMAIL", "person@example.com")
        .env("GIT_COMMITTER_NAME", "person")
        .env("GIT_COMMITTER_EMAIL", "person@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `fill` writes into `dir/work`, committed on `main` as the bare remote
/// `dir/remote.git`, and a person's clone of it in `dir/clone`: (remote, clone).
pub fn published_repo(dir: &Path, fill: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    fill(&work);
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "specs"]);
    let remote = dir.join("remote.git");
    git(
        dir,
        &["clone", "-q", "--bare", "work", remote.to_str().unwrap()],
    );
    let clone = dir.join("clone");
    git(dir, &["clone", "-q", remote.to_str().unwrap(), "clone"]);
    (remote, clone)
}
