//! The `gatehouse` binary: parse the command line and hand over to [`gatehouse::cli`].

/// mimalloc: glibc's allocator showed up in every profile (about a tenth of the CPU of a
/// `GET /v1/me`, with lock contention between its arenas).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
