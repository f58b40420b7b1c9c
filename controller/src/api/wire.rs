//! Between the store's rows and the protocol's bodies (`agentops_agents::protocol`): the store
//! keeps what the database holds, the protocol what agents exchange, and the API converts at
//! its boundary.

use agentops_agents::protocol;
use uuid::Uuid;

use super::ApiError;
use crate::store::queue;
use crate::writeback::paths;

impl From<queue::Assignment> for protocol::Assignment {
    fn from(task: queue::Assignment) -> Self {
        protocol::Assignment {
            id: task.id.to_string(),
            run_lease: task.run_lease,
            // The store's attempts count up from 0.
            attempt: u32::try_from(task.attempt).unwrap_or_default(),
            project: task.project,
            name: task.name,
            title: task.title,
            description: task.description,
            action: task.action,
            output: task.output,
            acceptance_criteria: task.acceptance_criteria,
            timeout_seconds: task.timeout_seconds.map(f64::from),
            revision: task.revision,
            lease_expires_at: Some(task.lease_expires_at),
            review_comments: task.review_comments,
        }
    }
}

impl From<queue::LeaseState> for protocol::LeaseState {
    fn from(state: queue::LeaseState) -> Self {
        protocol::LeaseState {
            id: state.id.to_string(),
            held: state.held,
            cancel: state.cancel,
        }
    }
}

impl From<queue::FailOutcome> for protocol::FailOutcome {
    fn from(outcome: queue::FailOutcome) -> Self {
        match outcome {
            queue::FailOutcome::Retry => protocol::FailOutcome::Retry,
            queue::FailOutcome::Failed => protocol::FailOutcome::Failed,
        }
    }
}

impl From<protocol::Artifact> for queue::Artifact {
    fn from(artifact: protocol::Artifact) -> Self {
        queue::Artifact {
            name: artifact.name,
            artifact_type: artifact.kind,
            key: artifact.key,
            // The column is a bigint; no file comes near its limit.
            size_bytes: artifact
                .size_bytes
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            mime_type: artifact.mime_type,
        }
    }
}

/// A task id from a request body.
pub(super) fn task_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|e| ApiError::BadRequest(format!("invalid task id `{id}`: {e}")))
}

/// An output file as the agent sent it, decoded: its content as bytes, and how Git should
/// hold it.
pub(super) fn output_file(file: protocol::OutputFile) -> Result<paths::OutputFile, String> {
    use base64::Engine as _;
    let content = match (file.content, file.content_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| {
                format!(
                    "output file `{}`: content_base64 is not base64: {e}",
                    file.path
                )
            })?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(format!(
                "output file `{}`: give content or content_base64, not both",
                file.path
            ));
        }
    };
    let (executable, symlink) = match file.mode.as_deref() {
        None | Some("file") => (false, false),
        Some("executable") => (true, false),
        Some("symlink") => (false, true),
        Some(other) => {
            return Err(format!(
                "output file `{}`: mode `{other}` is not one of file, executable, symlink",
                file.path
            ));
        }
    };
    Ok(paths::OutputFile {
        path: file.path,
        content,
        executable,
        symlink,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claimed task goes out as agents have always read it: the id as a UUID string,
    /// whole-second timeouts as integers, and no `review_comments` unless a review rejected
    /// the last attempt.
    #[test]
    fn an_assignment_goes_out_as_the_protocol_document() {
        let id = Uuid::parse_str("5b1e0000-0000-4000-8000-000000000001").unwrap();
        let expires = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:30.123456Z")
            .unwrap()
            .to_utc();
        let row = queue::Assignment {
            id,
            run_lease: 7,
            attempt: 2,
            project: "launch-website".to_owned(),
            name: "draft-copy".to_owned(),
            title: "Draft the landing page copy".to_owned(),
            description: String::new(),
            action: serde_json::json!({"prompt": "Write the copy"}),
            output: serde_json::json!({"mode": "pull-request", "paths": ["site/"]}),
            acceptance_criteria: vec!["copy.md exists".to_owned()],
            timeout_seconds: Some(1800),
            revision: None,
            lease_expires_at: expires,
            review_comments: None,
            ready_at: Some(expires),
        };
        let sent = serde_json::to_string(&protocol::Assignment::from(row.clone())).unwrap();
        assert_eq!(
            sent,
            r#"{"id":"5b1e0000-0000-4000-8000-000000000001","run_lease":7,"attempt":2,"project":"launch-website","name":"draft-copy","title":"Draft the landing page copy","description":"","action":{"prompt":"Write the copy"},"output":{"mode":"pull-request","paths":["site/"]},"acceptance_criteria":["copy.md exists"],"timeout_seconds":1800,"revision":null,"lease_expires_at":"2026-11-25T10:00:30.123456Z"}"#
        );
        let rejected = queue::Assignment {
            review_comments: Some("Shorter.".to_owned()),
            timeout_seconds: None,
            ..row
        };
        let sent = serde_json::to_value(protocol::Assignment::from(rejected)).unwrap();
        assert_eq!(sent["review_comments"], "Shorter.");
        assert_eq!(sent["timeout_seconds"], serde_json::Value::Null);
    }

    #[test]
    fn task_ids_in_bodies_must_be_uuids() {
        let error = match task_id("id-1") {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(error.contains("invalid task id `id-1`"), "{error}");
        assert!(task_id("5b1e0000-0000-4000-8000-000000000001").is_ok());
    }

    #[test]
    fn output_files_decode_text_base64_and_modes() {
        let file = |json: serde_json::Value| {
            output_file(serde_json::from_value::<protocol::OutputFile>(json).unwrap())
        };
        let text = file(serde_json::json!({"path": "site/a.md", "content": "hi"})).unwrap();
        assert_eq!((text.content, text.executable), (b"hi".to_vec(), false));
        let bytes = file(serde_json::json!({"path": "b", "content_base64": "/wA=",
                                            "mode": "executable"}))
        .unwrap();
        assert_eq!((bytes.content, bytes.executable), (vec![0xff, 0], true));
        assert!(
            file(serde_json::json!({"path": "c", "mode": "symlink"}))
                .unwrap()
                .symlink
        );
        let both = file(serde_json::json!({"path": "d", "content": "a", "content_base64": "YQ=="}))
            .unwrap_err();
        assert!(both.contains("`d`") && both.contains("not both"), "{both}");
        let mode = file(serde_json::json!({"path": "e", "mode": "fifo"})).unwrap_err();
        assert!(mode.contains("mode `fifo`"), "{mode}");
    }
}
