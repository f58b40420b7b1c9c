// `sqlx::migrate!` embeds the migrations at compile time but does not tell Cargo to rebuild
// when one is added, so a new migration would silently be missing from an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
