mod decide;
pub mod diff;
pub mod plan;
pub mod sync;
