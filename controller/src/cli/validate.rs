use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentops_specs::{Diagnostic, Object, parse_file, validate};

use super::Format;

/// Every spec file under `root`, as `(path relative to root, path on disk)`, in name order.
fn spec_files(root: &Path) -> Vec<(String, PathBuf)> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let rel = e.path().strip_prefix(root).ok()?;
            let rel = rel.to_str()?.replace('\\', "/");
            crate::source::git::is_spec_file(&rel).then(|| (rel, e.path().to_owned()))
        })
        .collect()
}

/// Parse `files` and check them together: the parse errors and those across objects.
fn check_together(files: &[(String, PathBuf)]) -> anyhow::Result<(Vec<Diagnostic>, usize)> {
    let mut diagnostics = Vec::new();
    let mut objects: Vec<Object> = Vec::new();
    for (rel, path) in files {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let parsed = parse_file(rel, &bytes);
        diagnostics.extend(parsed.errors);
        objects.extend(parsed.objects);
    }
    diagnostics.extend(validate(&objects).diagnostics);
    Ok((diagnostics, objects.len()))
}

/// Parse every spec file under `root` (or `root` itself) and check them together.
pub fn check(root: &Path) -> anyhow::Result<(Vec<Diagnostic>, usize)> {
    let files = if root.is_file() {
        vec![(root.display().to_string(), root.to_owned())]
    } else {
        spec_files(root)
    };
    let (mut diagnostics, objects) = check_together(&files)?;
    diagnostics.sort();
    diagnostics.dedup();
    Ok((diagnostics, objects))
}

/// Where files given one by one are checked.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Folder {
    /// `--root`: every spec file under it.
    Dir(PathBuf),
    /// A Git work tree: the spec files in its index (what is tracked or staged, which is what a
    /// commit would hold), read from the work tree. The index, not a walk of the tree, so
    /// that ignored build output and other people's tools are never read.
    WorkTree(PathBuf),
}

impl Folder {
    fn path(&self) -> &Path {
        match self {
            Folder::Dir(path) | Folder::WorkTree(path) => path,
        }
    }

    fn spec_files(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let dir = match self {
            Folder::Dir(dir) => return Ok(spec_files(dir)),
            Folder::WorkTree(dir) => dir,
        };
        let repo = git2::Repository::open(dir)
            .map_err(|e| anyhow::anyhow!("{}: {}", dir.display(), e.message()))?;
        let index = repo
            .index()
            .map_err(|e| anyhow::anyhow!("{}: {}", dir.display(), e.message()))?;
        let mut files: Vec<(String, PathBuf)> = index
            .iter()
            .filter_map(|entry| String::from_utf8(entry.path).ok())
            .filter(|rel| crate::source::git::is_spec_file(rel))
            .map(|rel| {
                let path = dir.join(&rel);
                (rel, path)
            })
            // Deleted from the work tree but not yet from the index: not in the next commit.
            .filter(|(_, path)| path.is_file())
            .collect();
        files.sort();
        files.dedup();
        Ok(files)
    }
}

/// The errors in `files`, checked with every spec file of the folder they belong to: `root`
/// when given, else the Git work tree each file is in (see [`Folder`]). References, duplicates and cycles
/// reach across the whole folder, as a sync of it would see them, and a task's project
/// follows from its place under `projects/<p>/tasks/` there; only errors in `files` are
/// kept, under their paths as given. A file in no work tree is checked with the others
/// given that are in none, under its path as given. Files that are not spec files of their
/// folder (other extensions, the controller's `.agentops/`) are skipped, and YAML of other
/// tools parses to nothing.
pub fn check_files(
    files: &[PathBuf],
    root: Option<&Path>,
) -> anyhow::Result<(Vec<Diagnostic>, usize)> {
    let root = match root {
        Some(root) => Some(
            root.canonicalize()
                .map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))?,
        ),
        None => None,
    };
    // Files by the folder they are checked in; `None` for files in no work tree.
    let mut groups: BTreeMap<Option<Folder>, Vec<&PathBuf>> = BTreeMap::new();
    for file in files {
        let folder = match &root {
            Some(root) => Some(Folder::Dir(root.clone())),
            None => git2::Repository::discover(file)
                .ok()
                .and_then(|repo| repo.workdir().map(Path::to_owned))
                .and_then(|dir| dir.canonicalize().ok())
                .map(Folder::WorkTree),
        };
        groups.entry(folder).or_default().push(file);
    }
    let mut diagnostics = Vec::new();
    let mut objects = 0;
    for (folder, given) in groups {
        let Some(folder) = folder else {
            let alone: Vec<(String, PathBuf)> = given
                .iter()
                .filter(|f| agentops_specs::is_spec_path(&f.to_string_lossy()))
                .map(|f| (f.display().to_string(), (*f).clone()))
                .collect();
            let (found, count) = check_together(&alone)?;
            diagnostics.extend(found);
            objects += count;
            continue;
        };
        // Path relative to the folder → path as given.
        let mut shown: HashMap<String, String> = HashMap::new();
        for file in given {
            let full = file
                .canonicalize()
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let Some(rel) = full
                .strip_prefix(folder.path())
                .ok()
                .and_then(|rel| rel.to_str())
                .map(|rel| rel.replace('\\', "/"))
            else {
                anyhow::bail!(
                    "{} is not inside {}",
                    file.display(),
                    folder.path().display()
                );
            };
            if crate::source::git::is_spec_file(&rel) {
                shown.insert(rel, file.display().to_string());
            }
        }
        if shown.is_empty() {
            continue;
        }
        let mut all = folder.spec_files()?;
        // A file given but not yet added to the index is checked all the same.
        for rel in shown.keys() {
            if !all.iter().any(|(r, _)| r == rel) {
                all.push((rel.clone(), folder.path().join(rel)));
            }
        }
        all.sort();
        let (found, count) = check_together(&all)?;
        objects += count;
        diagnostics.extend(found.into_iter().filter_map(|mut d| {
            d.path = shown.get(&d.path)?.clone();
            Some(d)
        }));
    }
    diagnostics.sort();
    diagnostics.dedup();
    Ok((diagnostics, objects))
}

/// `agentops validate PATH...`: one directory is checked whole; files (as a pre-commit hook
/// passes them) are checked in their folder, see [`check_files`].
pub fn run(paths: &[PathBuf], root: Option<&Path>, format: Format) -> anyhow::Result<ExitCode> {
    for path in paths {
        if !path.exists() {
            anyhow::bail!("{} does not exist", path.display());
        }
    }
    let (mut diagnostics, mut objects) = (Vec::new(), 0);
    let (dirs, files): (Vec<&PathBuf>, Vec<&PathBuf>) = paths.iter().partition(|p| p.is_dir());
    for dir in dirs {
        let (found, count) = check(dir)?;
        diagnostics.extend(found);
        objects += count;
    }
    if !files.is_empty() {
        let files: Vec<PathBuf> = files.into_iter().cloned().collect();
        let (found, count) = check_files(&files, root)?;
        diagnostics.extend(found);
        objects += count;
    }
    diagnostics.sort();
    diagnostics.dedup();
    match format {
        Format::Text => {
            for d in &diagnostics {
                println!("{d}");
            }
            if diagnostics.is_empty() {
                eprintln!("{objects} objects, no errors");
            } else {
                eprintln!("{} errors", diagnostics.len());
            }
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&diagnostics)?),
    }
    Ok(if diagnostics.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
