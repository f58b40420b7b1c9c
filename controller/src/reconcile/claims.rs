//! Which source declares which object, when several sources (Git and Kubernetes namespaces)
//! run in one controller. An object belongs to one source: one declared by two is an error on
//! both, each flagging it with the other's name, and neither overwrites the other's row.
//!
//! Each syncer declares what it read after every decision; a change to another source's
//! declarations makes the others decide afresh (their [`Claims::changed`] wakes).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use agentops_specs::ObjectKey;

#[derive(Clone, Default)]
pub struct Claims {
    inner: Arc<RwLock<HashMap<String, HashSet<ObjectKey>>>>,
    version: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("version", &self.version())
            .finish()
    }
}

impl Claims {
    /// Bumped whenever a source's declarations change.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Wakes on every change of declarations.
    pub fn changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Replace what `source` declares. Returns whether it changed.
    pub fn declare(&self, source: &str, keys: HashSet<ObjectKey>) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.get(source) == Some(&keys) {
            return false;
        }
        inner.insert(source.to_owned(), keys);
        drop(inner);
        self.version.send_modify(|v| *v += 1);
        true
    }

    /// For `source`'s decisions: the other sources that declare a key, by key.
    pub fn others(&self, source: &str) -> Conflicts {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut by_key: HashMap<ObjectKey, Vec<String>> = HashMap::new();
        for (other, keys) in inner.iter().filter(|(s, _)| s.as_str() != source) {
            for key in keys {
                by_key.entry(key.clone()).or_default().push(other.clone());
            }
        }
        for sources in by_key.values_mut() {
            sources.sort();
        }
        Conflicts(by_key)
    }
}

/// Keys other sources declare, with their names.
#[derive(Debug, Default)]
pub struct Conflicts(HashMap<ObjectKey, Vec<String>>);

impl Conflicts {
    /// The error for `key` if another source declares it too.
    pub fn message(&self, key: &ObjectKey) -> Option<String> {
        let sources = self.0.get(key)?;
        let names: Vec<String> = sources.iter().map(|s| format!("`{s}`")).collect();
        Some(format!(
            "{key} is also declared by source {}; an object belongs to one source: remove it \
             from all but one",
            names.join(", ")
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> HashSet<ObjectKey> {
        names
            .iter()
            .map(|n| ObjectKey::Project((*n).into()))
            .collect()
    }

    #[test]
    fn a_key_of_two_sources_is_a_conflict_for_each() {
        let claims = Claims::default();
        assert!(claims.declare("default", keys(&["web", "docs"])));
        assert!(claims.declare("kube:team", keys(&["web", "ops"])));
        assert!(
            !claims.declare("kube:team", keys(&["web", "ops"])),
            "unchanged"
        );
        assert_eq!(claims.version(), 2);
        let web = ObjectKey::Project("web".into());
        let git = claims.others("default");
        assert!(git.message(&web).unwrap().contains("`kube:team`"));
        assert_eq!(git.message(&ObjectKey::Project("docs".into())), None);
        let kube = claims.others("kube:team");
        assert!(kube.message(&web).unwrap().contains("`default`"));
        assert_eq!(kube.message(&ObjectKey::Project("ops".into())), None);
    }
}
