//! `sqlx::migrate!` embeds the migrations at compile time, but Cargo does not know that
//! it reads the directory: without this, a new migration file is not picked up until
//! something else changes (sqlx's documented build script).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
