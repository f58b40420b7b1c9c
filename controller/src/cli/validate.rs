use std::path::Path;
use std::process::ExitCode;

use agentops_specs::{Diagnostic, Object, parse_file, validate};

use super::Format;

/// Parse every spec file under `root` (or `root` itself) and check them together.
pub fn check(root: &Path) -> anyhow::Result<(Vec<Diagnostic>, usize)> {
    let mut diagnostics = Vec::new();
    let mut objects: Vec<Object> = Vec::new();
    let files: Vec<(String, std::path::PathBuf)> = if root.is_file() {
        vec![(root.display().to_string(), root.to_owned())]
    } else {
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
    };
    for (rel, path) in &files {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let parsed = parse_file(rel, &bytes);
        diagnostics.extend(parsed.errors);
        objects.extend(parsed.objects);
    }
    diagnostics.extend(validate(&objects).diagnostics);
    diagnostics.sort();
    diagnostics.dedup();
    Ok((diagnostics, objects.len()))
}

pub fn run(root: &Path, format: Format) -> anyhow::Result<ExitCode> {
    if !root.exists() {
        anyhow::bail!("{} does not exist", root.display());
    }
    let (diagnostics, objects) = check(root)?;
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
