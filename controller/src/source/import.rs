//! A folder of specs that is not a Git repository (such as `examples/`) becomes one: each sync
//! snapshots the folder into a commit on the import repository's branch, when it changed.

use std::path::Path;

use git2::{FileMode, Oid, Repository, Signature};

use super::SourceError;

fn git(doing: &'static str) -> impl Fn(git2::Error) -> SourceError {
    move |source| SourceError::Git { doing, source }
}

/// Commit the folder's current content on `branch` if it differs from the branch's head.
/// Returns whether a commit was made.
pub fn snapshot(repo: &Repository, folder: &Path, branch: &str) -> Result<bool, SourceError> {
    let mut tree = write_tree(repo, folder)?;
    let refname = format!("refs/heads/{branch}");
    let parent = repo
        .find_reference(&refname)
        .ok()
        .and_then(|r| r.peel_to_commit().ok());
    // The controller's status lives only in the import repository: keep it across snapshots.
    if let Some(status) = parent
        .as_ref()
        .and_then(|p| p.tree().ok())
        .and_then(|t| t.get_name(".agentops").map(|e| (e.id(), e.filemode())))
    {
        let base = repo
            .find_tree(tree)
            .map_err(git("reading the snapshot tree"))?;
        if base.get_name(".agentops").is_none() {
            let mut builder = repo
                .treebuilder(Some(&base))
                .map_err(git("building a tree"))?;
            builder
                .insert(".agentops", status.0, status.1)
                .map_err(git("keeping the status directory"))?;
            tree = builder.write().map_err(git("writing a tree"))?;
        }
    }
    if parent.as_ref().is_some_and(|p| p.tree_id() == tree) {
        return Ok(false);
    }
    let tree = repo
        .find_tree(tree)
        .map_err(git("reading the snapshot tree"))?;
    let signature =
        Signature::now("agentops", "agentops@localhost").map_err(git("making a signature"))?;
    let message = format!("Import {}", folder.display());
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    repo.commit(
        Some(&refname),
        &signature,
        &signature,
        &message,
        &tree,
        &parents,
    )
    .map_err(git("committing the snapshot"))?;
    Ok(true)
}

/// The folder's files as a tree in `repo`, `.git` left out.
pub fn write_tree(repo: &Repository, dir: &Path) -> Result<Oid, SourceError> {
    let io = |source| SourceError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut builder = repo.treebuilder(None).map_err(git("building a tree"))?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if name_str == ".git" {
            continue;
        }
        let file_type = entry.file_type().map_err(io)?;
        let path = entry.path();
        if file_type.is_dir() {
            let subtree = write_tree(repo, &path)?;
            // Git has no empty directories.
            if repo
                .find_tree(subtree)
                .map_err(git("reading a subtree"))?
                .is_empty()
            {
                continue;
            }
            builder
                .insert(name_str, subtree, FileMode::Tree.into())
                .map_err(git("adding a directory"))?;
        } else if file_type.is_file() {
            let bytes = std::fs::read(&path).map_err(|source| SourceError::Io {
                path: path.clone(),
                source,
            })?;
            let blob = repo.blob(&bytes).map_err(git("storing a file"))?;
            builder
                .insert(name_str, blob, FileMode::Blob.into())
                .map_err(git("adding a file"))?;
        }
        // Symlinks and other special files are not imported: a spec is a regular file.
    }
    builder.write().map_err(git("writing a tree"))
}
