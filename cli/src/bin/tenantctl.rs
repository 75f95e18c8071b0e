//! `tenantctl`: the tenant's CLI (local, or `--host` over SSH).
fn main() -> std::process::ExitCode {
    leasehold_cli::tenant::main()
}
