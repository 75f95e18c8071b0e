//! `leasehold-engine-shim [--launcher-joins [--secrets-after-join]] RUN_DIR`: starts and supervises one confined
//! engine (see `leasehold_engines::launch`). Started by the agent, never by
//! hand.
//!
//! `leasehold-engine-shim --hold`: the main process of
//! leasehold-engines.service, holding the engines' cgroup tree (see
//! `leasehold_engines::holder`).

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 2 && args[1] == "--hold" {
        std::process::exit(leasehold_engines::holder::hold_main());
    }
    std::process::exit(leasehold_engines::launch::shim_main(&args));
}
