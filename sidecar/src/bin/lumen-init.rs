//! `lumen-init`: installs a pod's traffic capture — what the injector runs
//! as the pod's init container (with NET_ADMIN), before the app and its
//! sidecar start. See [`lumen_sidecar::capture`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use lumen_sidecar::capture::{CaptureArgs, install};

#[derive(Parser)]
#[command(
    name = "lumen-init",
    version,
    about = "Redirect a pod's TCP through its Lumen sidecar (iptables), as Istio's istio-iptables does"
)]
struct Cli {
    #[command(flatten)]
    capture: CaptureArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match install(&cli.capture) {
        Ok(rules) => {
            if cli.capture.dry_run {
                print!("{rules}");
            } else {
                eprintln!("lumen-init: capture installed\n{rules}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lumen-init: {e}");
            ExitCode::FAILURE
        }
    }
}
