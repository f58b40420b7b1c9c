//! The agentops resource model.
//!
//! One source of truth for the Project, Task, Agent and Tool resources, whether they come from
//! YAML files in Git or from Kubernetes custom resources: the types ([`model`], [`status`]), the
//! YAML reader with `path:line:column` errors ([`parse_file`]), the checks across objects
//! ([`validate()`]), and the CRDs ([`crd`]) and editor JSON Schemas ([`schema`]) derived from the
//! same types.

pub mod crd;
pub mod diagnostic;
pub mod model;
pub mod names;
pub mod parse;
pub mod schema;
pub mod status;
pub mod validate;

pub use diagnostic::Diagnostic;
pub use model::*;
pub use parse::{ParsedFile, parse_file};
pub use validate::{Declared, Validation, validate, validate_with_known};

/// Whether a repository path is one the Git source reads.
pub fn is_spec_path(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}
