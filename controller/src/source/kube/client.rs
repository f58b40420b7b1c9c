//! The one place the Kubernetes client is made: in-cluster configuration inside a pod,
//! `KUBECONFIG` (or `~/.kube/config`) elsewhere.

use super::KubeError;

pub async fn client() -> Result<kube::Client, KubeError> {
    kube::Client::try_default().await.map_err(KubeError::Client)
}
