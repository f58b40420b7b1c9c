//! Which paths an agent may write: a pure check of each output path against the task's
//! `output.paths`, before anything touches Git.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("output file {index}: the path is empty")]
    Empty { index: usize },
    #[error(
        "output file `{path}`: absolute paths are refused; give a path relative to the repository"
    )]
    Absolute { path: String },
    #[error("output file `{path}`: `..` is refused; paths may not leave the output directories")]
    DotDot { path: String },
    #[error(
        "output file `{path}`: `{component}` is refused; give a normalized path (no `.`, empty components or backslashes)"
    )]
    NotNormalized { path: String, component: String },
    #[error("output file `{path}`: paths inside `.git` are refused")]
    GitDir { path: String },
    #[error(
        "output file `{path}`: `.agentops/` belongs to the controller; agents may not write it"
    )]
    ControllerDir { path: String },
    #[error("output file `{path}`: symlinks are refused; send the file's content instead")]
    Symlink { path: String },
    #[error("output file `{path}`: it passes through the symlink `{link}` in the repository")]
    ThroughSymlink { path: String, link: String },
    #[error("output file `{path}`: `{at}` is a file in the repository, not a directory")]
    NotADirectory { path: String, at: String },
    #[error("output file `{path}` is outside the task's output.paths ({allowed})")]
    NotAllowed { path: String, allowed: String },
    #[error("output file `{path}` is given twice")]
    Duplicate { path: String },
    #[error("the task declares no output.paths, so it may not write files")]
    NoOutputPaths,
    #[error("the task's output mode is `none`, so it may not write files")]
    ModeNone,
    #[error("the task's output mode `{0}` is not one of pull-request, commit, none")]
    UnknownMode(String),
}

/// Where a task's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// A branch `agentops/<project>/<task>` and, with a forge, a pull request.
    PullRequest,
    /// Straight onto the followed branch.
    Commit,
}

/// The task's `output` spec as the store holds it: `{mode, paths}`. `pull-request` is the
/// default mode, as in the spec.
pub fn output_spec(output: &Value) -> Result<(OutputMode, Vec<String>), PathError> {
    let mode = match output.get("mode").and_then(Value::as_str) {
        None | Some("pull-request") | Some("pullRequest") => OutputMode::PullRequest,
        Some("commit") => OutputMode::Commit,
        Some("none") => return Err(PathError::ModeNone),
        Some(other) => return Err(PathError::UnknownMode(other.to_owned())),
    };
    let paths: Vec<String> = output
        .get("paths")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|p| p.trim_matches('/').to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if paths.is_empty() {
        return Err(PathError::NoOutputPaths);
    }
    Ok((mode, paths))
}

fn is_named(component: &str, name: &str) -> bool {
    // Case-insensitive: on macOS and Windows checkouts `.GIT` is `.git`.
    component.eq_ignore_ascii_case(name)
}

/// Check one path; `allowed` are the task's `output.paths` (directories or files, without
/// surrounding slashes).
pub fn check_path(index: usize, path: &str, allowed: &[String]) -> Result<(), PathError> {
    let owned = || path.to_owned();
    if path.is_empty() {
        return Err(PathError::Empty { index });
    }
    if path.starts_with('/') || path.starts_with('~') || path.as_bytes().get(1) == Some(&b':') {
        return Err(PathError::Absolute { path: owned() });
    }
    let components: Vec<&str> = path.split('/').collect();
    if components.contains(&"..") {
        return Err(PathError::DotDot { path: owned() });
    }
    for component in &components {
        if is_named(component, ".git") {
            return Err(PathError::GitDir { path: owned() });
        }
    }
    if is_named(components[0], ".agentops") {
        return Err(PathError::ControllerDir { path: owned() });
    }
    if let Some(bad) = components
        .iter()
        .find(|c| c.is_empty() || **c == "." || c.contains('\\') || c.contains('\0'))
    {
        return Err(PathError::NotNormalized {
            path: owned(),
            component: (*bad).to_owned(),
        });
    }
    let inside = allowed.iter().any(|a| {
        path == a
            || (path.len() > a.len()
                && path.starts_with(a.as_str())
                && path.as_bytes()[a.len()] == b'/')
    });
    if !inside {
        return Err(PathError::NotAllowed {
            path: owned(),
            allowed: allowed.join(", "),
        });
    }
    Ok(())
}

/// An output file as the protocol carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub path: String,
    pub content: Vec<u8>,
    pub executable: bool,
    pub symlink: bool,
}

/// Check every file of a completion against the task's output spec.
pub fn check_files(files: &[OutputFile], output: &Value) -> Result<OutputMode, PathError> {
    let (mode, allowed) = output_spec(output)?;
    let mut seen = std::collections::HashSet::new();
    for (i, f) in files.iter().enumerate() {
        check_path(i, &f.path, &allowed)?;
        if f.symlink {
            return Err(PathError::Symlink {
                path: f.path.clone(),
            });
        }
        if !seen.insert(f.path.as_str()) {
            return Err(PathError::Duplicate {
                path: f.path.clone(),
            });
        }
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allowed() -> Vec<String> {
        vec!["site".to_owned(), "docs/readme.md".to_owned()]
    }

    #[test]
    fn paths_inside_the_output_paths_pass() {
        for path in ["site/copy.md", "site/a/b/c.txt", "docs/readme.md", "site"] {
            assert_eq!(check_path(0, path, &allowed()), Ok(()), "{path}");
        }
    }

    #[test]
    fn dot_dot_is_refused() {
        let e = check_path(0, "site/../README.md", &allowed()).unwrap_err();
        assert!(matches!(e, PathError::DotDot { .. }));
        assert!(e.to_string().contains("`..` is refused"), "{e}");
    }

    #[test]
    fn absolute_paths_are_refused() {
        for path in ["/etc/passwd", "C:/x", "~/x"] {
            let e = check_path(0, path, &allowed()).unwrap_err();
            assert!(matches!(e, PathError::Absolute { .. }), "{path}: {e}");
        }
    }

    #[test]
    fn git_dir_is_refused_anywhere_in_any_case() {
        for path in [".git/config", "site/.git/hooks/pre-commit", "site/.GIT/x"] {
            let e = check_path(0, path, &allowed()).unwrap_err();
            assert!(matches!(e, PathError::GitDir { .. }), "{path}: {e}");
        }
    }

    #[test]
    fn controller_dir_is_refused_even_when_listed() {
        let listed = vec![".agentops".to_owned()];
        let e = check_path(0, ".agentops/status/x.yaml", &listed).unwrap_err();
        assert!(matches!(e, PathError::ControllerDir { .. }));
        assert!(e.to_string().contains("belongs to the controller"), "{e}");
    }

    #[test]
    fn symlinks_are_refused() {
        let files = vec![OutputFile {
            path: "site/link".to_owned(),
            content: b"../../etc/passwd".to_vec(),
            executable: false,
            symlink: true,
        }];
        let e = check_files(&files, &json!({"paths": ["site/"]})).unwrap_err();
        assert_eq!(
            e,
            PathError::Symlink {
                path: "site/link".to_owned()
            }
        );
    }

    #[test]
    fn paths_outside_the_output_paths_are_refused() {
        for path in ["README.md", "sitemap.xml", "docs/other.md"] {
            let e = check_path(0, path, &allowed()).unwrap_err();
            assert!(matches!(e, PathError::NotAllowed { .. }), "{path}: {e}");
        }
    }

    #[test]
    fn unnormalized_paths_are_refused() {
        for path in ["site//x", "site/./x", "site/a\\b", ""] {
            assert!(check_path(0, path, &allowed()).is_err(), "{path}");
        }
    }

    #[test]
    fn output_spec_modes() {
        assert_eq!(
            output_spec(&json!({"mode": "commit", "paths": ["a/"]})).unwrap(),
            (OutputMode::Commit, vec!["a".to_owned()])
        );
        assert_eq!(
            output_spec(&json!({"paths": ["a"]})).unwrap().0,
            OutputMode::PullRequest
        );
        assert_eq!(
            output_spec(&json!({"mode": "none", "paths": ["a"]})),
            Err(PathError::ModeNone)
        );
        assert_eq!(
            output_spec(&json!({"mode": "pull-request"})),
            Err(PathError::NoOutputPaths)
        );
        assert_eq!(output_spec(&Value::Null), Err(PathError::NoOutputPaths));
    }

    #[test]
    fn duplicates_are_refused() {
        let f = OutputFile {
            path: "site/a".to_owned(),
            content: Vec::new(),
            executable: false,
            symlink: false,
        };
        let e = check_files(&[f.clone(), f], &json!({"paths": ["site"]})).unwrap_err();
        assert!(matches!(e, PathError::Duplicate { .. }));
    }
}
