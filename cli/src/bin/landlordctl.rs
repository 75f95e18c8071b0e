//! `landlordctl`: the landlord's CLI (local system bus).
fn main() -> std::process::ExitCode {
    leasehold_cli::landlord::main()
}
