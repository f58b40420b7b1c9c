//! The four kinds, watched with kube-runtime's watcher (list, then watch from the list's
//! `resourceVersion`; a watch that ends resumes from the last version seen, a `410 Gone`
//! lists again; errors back off). Each change arrives on one channel.

use agentops_specs::{AgentResource, Kind, ProjectResource, TaskResource, ToolResource};
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use super::objects::Resource;

/// What the API server told about one kind.
#[derive(Debug)]
pub enum Change {
    Apply(Resource),
    Delete(Resource),
    /// A (re)list: these are all the resources of the kind now, in the watched namespaces.
    Listed(Kind, Vec<Resource>),
    /// The watch of a kind failed; it is retried with backoff.
    Failed(Kind, String),
}

/// The API resource of a kind, for an untyped [`Api`]: a resource that does not parse is then
/// reported on the resource, not fatal to the watch of its whole kind.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Project => ApiResource::erase::<ProjectResource>(&()),
        Kind::Task => ApiResource::erase::<TaskResource>(&()),
        Kind::Agent => ApiResource::erase::<AgentResource>(&()),
        Kind::Tool => ApiResource::erase::<ToolResource>(&()),
    }
}

/// The untyped API of a kind in `namespace`, or in every namespace.
pub fn api(client: &kube::Client, kind: Kind, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = api_resource(kind);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// The running watchers; dropping this stops them.
pub struct Watch {
    pub changes: mpsc::Receiver<Change>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Watch the four kinds in `namespace` (every namespace for `None`).
pub fn watch(client: &kube::Client, namespace: Option<&str>) -> Watch {
    let (tx, changes) = mpsc::channel(4096);
    let tasks = Kind::ALL
        .into_iter()
        .map(|kind| tokio::spawn(watch_kind(api(client, kind, namespace), kind, tx.clone())))
        .collect();
    Watch { changes, tasks }
}

async fn watch_kind(api: Api<DynamicObject>, kind: Kind, tx: mpsc::Sender<Change>) {
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Vec<Resource> = Vec::new();
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listing.extend(Resource::from_dynamic(kind, &object));
                continue;
            }
            Ok(watcher::Event::InitDone) => Change::Listed(kind, std::mem::take(&mut listing)),
            Ok(watcher::Event::Apply(object)) => match Resource::from_dynamic(kind, &object) {
                Some(resource) => Change::Apply(resource),
                None => continue,
            },
            Ok(watcher::Event::Delete(object)) => match Resource::from_dynamic(kind, &object) {
                Some(resource) => Change::Delete(resource),
                None => continue,
            },
            Err(error) => Change::Failed(kind, crate::error_chain(&error)),
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}
