//! `landlordctl`: the landlord's CLI (local, or `--host` over SSH).
fn main() -> std::process::ExitCode {
    leasehold_cli::landlord::main()
}
