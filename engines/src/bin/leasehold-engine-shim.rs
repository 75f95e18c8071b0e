//! `leasehold-engine-shim RUN_DIR`: starts and supervises one confined
//! engine (see `leasehold_engines::launch`). Started by the agent, never by
//! hand.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    std::process::exit(leasehold_engines::launch::shim_main(&args));
}
