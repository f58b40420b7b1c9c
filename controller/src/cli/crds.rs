//! `agentops crds` and `agentops schema`: the CRDs and the editor JSON Schemas, generated from
//! the spec types so that neither can drift from what the parser reads.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentops_specs::{Kind, crd, schema};
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct CrdsArgs {
    /// Write one file per CRD, `DIR/agentops.dev_<plural>.yaml`, instead of one YAML stream
    /// to stdout.
    #[arg(long, env = "AGENTOPS_CRDS_DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Write `DIR/<kind>.json` for each kind and `DIR/all.json` for files of several kinds,
    /// instead of printing `all.json` to stdout.
    #[arg(long, env = "AGENTOPS_SCHEMA_DIR")]
    pub dir: Option<PathBuf>,
}

pub fn crds(args: &CrdsArgs) -> anyhow::Result<ExitCode> {
    match &args.dir {
        None => stdout(&crd::to_yaml_stream()?)?,
        Some(dir) => {
            for kind in Kind::ALL {
                write(dir, &crd::file_name(kind), &crd::to_yaml(kind)?)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn schema(args: &SchemaArgs) -> anyhow::Result<ExitCode> {
    match &args.dir {
        None => stdout(&json(&schema::all_schema())?)?,
        Some(dir) => {
            for kind in Kind::ALL {
                let text = json(&schema::document_schema(kind))?;
                write(dir, &schema::file_name(kind), &text)?;
            }
            write(dir, schema::ALL_FILE_NAME, &json(&schema::all_schema())?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Written rather than printed so that a closed pipe (`| head`) is an error, not a panic.
fn stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

fn json(value: &serde_json::Value) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
