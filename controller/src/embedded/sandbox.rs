//! A task's checkout and what its command changed in it.

use std::collections::HashMap;
use std::path::Path;

use git2::{ObjectType, Oid, TreeWalkMode, TreeWalkResult};

use crate::error_chain;
use crate::source::git::GitSource;
use crate::writeback::git::revision_commit;

use super::*;

/// The commit a task works on: the dispatch revision, or the followed branch's head when it
/// is unknown or the head descends from it (so the merged outputs of its dependencies are
/// there); a dispatch revision the head has moved away from (a force-push) is kept as it was.
fn checkout_commit(
    repo: &git2::Repository,
    source: &GitSource,
    revision: Option<&str>,
) -> Result<Oid, AgentError> {
    if let Err(e) = source.refresh(repo, &[]) {
        tracing::warn!("checking out without a fetch: {}", error_chain(&e));
    }
    let head = source.head(repo)?;
    Ok(
        match revision
            .and_then(revision_commit)
            .filter(|c| repo.find_commit(*c).is_ok())
        {
            Some(dispatched)
                if dispatched != head
                    && !repo.graph_descendant_of(head, dispatched).unwrap_or(false) =>
            {
                dispatched
            }
            _ => head,
        },
    )
}

/// Each file of `commit`'s tree in tree order: its path, blob and whether it is executable.
/// Symlinks are left out: a command must not be led outside its checkout.
fn each_file(
    repo: &git2::Repository,
    commit: Oid,
    mut f: impl FnMut(&str, &git2::Blob<'_>, bool) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(git("reading the dispatch tree"))?;
    let mut failed = None;
    tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
        if entry.kind() != Some(ObjectType::Blob) {
            return TreeWalkResult::Ok;
        }
        let path = format!("{parent}{}", entry.name().unwrap_or_default());
        let mode = entry.filemode();
        if mode == i32::from(git2::FileMode::Link) {
            return TreeWalkResult::Ok;
        }
        let executable = mode == i32::from(git2::FileMode::BlobExecutable);
        let done = repo
            .find_blob(entry.id())
            .map_err(git("reading a blob"))
            .and_then(|blob| f(&path, &blob, executable));
        match done {
            Ok(()) => TreeWalkResult::Ok,
            Err(e) => {
                failed = Some(e);
                TreeWalkResult::Abort
            }
        }
    })
    .or_else(|e| match failed.take() {
        Some(_) => Ok(()),
        None => Err(e),
    })
    .map_err(git("checking out"))?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Write the tree a task works on ([`checkout_commit`]) into `dir`, returning each file's
/// blob id.
pub fn check_out(
    source: &GitSource,
    revision: Option<&str>,
    dir: &Path,
) -> Result<HashMap<String, Oid>, AgentError> {
    let repo = source.open()?;
    let commit = checkout_commit(&repo, source, revision)?;
    std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = HashMap::new();
    each_file(&repo, commit, |path, blob, executable| {
        let target = dir.join(path);
        let io = |source| AgentError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&target, blob.content()).map_err(io)?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                .map_err(io)?;
        }
        files.insert(path.to_owned(), blob.id());
        Ok(())
    })?;
    Ok(files)
}

/// The tree a task works on as a tar archive of its files (mode 644, or 755 for
/// executables; no symlinks), and its commit: what agents off the controller check out.
pub fn archive(
    source: &GitSource,
    revision: Option<&str>,
) -> Result<(String, Vec<u8>), AgentError> {
    let repo = source.open()?;
    let commit = checkout_commit(&repo, source, revision)?;
    let mut tar = tar::Builder::new(Vec::new());
    each_file(&repo, commit, |path, blob, executable| {
        let mut header = tar::Header::new_gnu();
        header.set_size(blob.content().len() as u64);
        header.set_mode(if executable { 0o755 } else { 0o644 });
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, blob.content())
            .map_err(|source| AgentError::Io {
                path: path.to_owned(),
                source,
            })
    })?;
    let bytes = tar.into_inner().map_err(|source| AgentError::Io {
        path: "the checkout archive".to_owned(),
        source,
    })?;
    Ok((commit.to_string(), bytes))
}

/// A file a command added or changed.
pub struct Changed {
    pub path: String,
    pub content: Vec<u8>,
    pub executable: bool,
}

/// The files under `dir` that are new or differ from `original`. A symlink the command made
/// counts as changed, with no content: it is refused wherever it is.
pub fn changed_files(
    dir: &Path,
    original: &HashMap<String, Oid>,
) -> Result<Vec<Changed>, AgentError> {
    let mut changed = Vec::new();
    for entry in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(|e| AgentError::Io {
            path: dir.display().to_string(),
            source: e.into(),
        })?;
        if entry.file_type().is_dir() {
            continue;
        }
        let Ok(relative) = entry.path().strip_prefix(dir) else {
            continue;
        };
        let path = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if entry.file_type().is_symlink() {
            changed.push(Changed {
                path: format!("{path} (a symlink)"),
                content: Vec::new(),
                executable: false,
            });
            continue;
        }
        let content = std::fs::read(entry.path()).map_err(|source| AgentError::Io {
            path: path.clone(),
            source,
        })?;
        let oid = Oid::hash_object(ObjectType::Blob, &content).map_err(git("hashing a file"))?;
        if original.get(&path) == Some(&oid) {
            continue;
        }
        let executable = {
            use std::os::unix::fs::PermissionsExt;
            entry
                .metadata()
                .map(|m| m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        };
        changed.push(Changed {
            path,
            content,
            executable,
        });
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentops_agents::prompt::is_within;

    #[test]
    fn changed_files_are_the_new_and_the_modified() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, content: &str| {
            let target = dir.path().join(path);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(target, content).unwrap();
        };
        write("same.txt", "same\n");
        write("edited.txt", "before\n");
        let hash = |content: &str| Oid::hash_object(ObjectType::Blob, content.as_bytes()).unwrap();
        let original: HashMap<String, Oid> = [
            ("same.txt".to_owned(), hash("same\n")),
            ("edited.txt".to_owned(), hash("before\n")),
            ("deleted.txt".to_owned(), hash("gone\n")),
        ]
        .into();
        write("edited.txt", "after\n");
        write("new/deep/file.txt", "new\n");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let changed = changed_files(dir.path(), &original).unwrap();
        let paths: Vec<&str> = changed.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["edited.txt", "link (a symlink)", "new/deep/file.txt"]
        );
        assert_eq!(changed[0].content, b"after\n");
        // A symlink is never within any output path.
        assert!(!is_within(&changed[1].path, &["link".to_owned()]));
    }
}
