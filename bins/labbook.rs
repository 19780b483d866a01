//! `labbook`: the operator's command line (see `labbook --help`).
fn main() -> std::process::ExitCode {
    labbook::cli::main()
}
