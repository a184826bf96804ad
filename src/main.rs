//! The `gatehouse` binary: parse the command line and hand over to [`gatehouse::cli`].

fn main() -> std::process::ExitCode {
    gatehouse::cli::main()
}
