pub mod claims;
mod decide;
pub mod diff;
pub mod kube;
pub mod plan;
pub mod sync;
