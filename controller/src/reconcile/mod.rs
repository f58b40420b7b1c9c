pub mod plan;
pub mod sync;
