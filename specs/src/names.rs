//! Name and path rules shared by the parser, the API and write-back.

/// [`check_dns_label`] as a schema pattern, for the CRDs and the JSON Schemas (together with
/// [`DNS_LABEL_MAX`]): the API server and editors refuse the names the parser refuses.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// The longest name [`check_dns_label`] allows.
pub const DNS_LABEL_MAX: usize = 63;
/// A `dependsOn` entry: `task` or `project/task`, each a DNS-1123 label.
pub const DEPENDENCY_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$";
/// Text that says something: the parser refuses blank titles, prompts and capabilities.
pub const NOT_BLANK_PATTERN: &str = "\\S";

/// Kubernetes' DNS-1123 label: what a resource name must be so the same file is a valid CR.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > DNS_LABEL_MAX {
        return Err(format!(
            "is {} characters; at most 63 are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "contains {c:?}; only lowercase letters, digits and '-' are allowed"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// A path an agent may be allowed to write: relative, inside the repository, and outside the
/// places the controller and Git own.
pub fn check_output_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.starts_with('/') || path.starts_with('\\') || path.contains(':') {
        return Err("must be relative to the repository root".into());
    }
    for part in path.split(['/', '\\']) {
        match part {
            ".." => return Err("must not contain `..`".into()),
            ".git" => return Err("must not be inside .git".into()),
            ".agentops" => {
                return Err("must not be inside .agentops (the controller owns it)".into());
            }
            _ => {}
        }
    }
    if path.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["a", "draft-copy", "x1", &"a".repeat(63)] {
            assert_eq!(check_dns_label(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "ä", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_paths() {
        for good in ["site/", "site/copy.md", "docs", "a/.gitkeep"] {
            assert_eq!(check_output_path(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/etc",
            "../x",
            "a/../../b",
            ".git/config",
            ".agentops/status",
            "C:/x",
            "a\\..\\b",
        ] {
            assert!(check_output_path(bad).is_err(), "{bad}");
        }
    }
}
