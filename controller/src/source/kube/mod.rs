//! The Kubernetes source: the four custom resources, watched with kube-runtime and turned into
//! the same spec documents the Git source reads, so that one parser and one plan decide both.
//!
//! Each namespace is a source of its own, `kube:<namespace>`, whose revision is the
//! `resourceVersion` of the last change to a spec in it.

pub mod client;
pub mod objects;
pub mod watch;

pub use client::client;
pub use objects::{CrRef, FINALIZER, Resource, namespace_of_source, source_name};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot configure the Kubernetes client (in-cluster or KUBECONFIG)")]
    Client(#[source] kube::Error),
    #[error("Kubernetes API call failed while {doing}")]
    Api {
        doing: String,
        #[source]
        source: kube::Error,
    },
}
