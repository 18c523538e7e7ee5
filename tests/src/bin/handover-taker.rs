//! Plays a handover target that dies on the way: asks the luvmm behind SOCKET to hand its VM
//! over, takes the fds, and exits without confirming (the fds close with it). The source must
//! then still be able to resume the VM, devices and all.
//!
//!     handover-taker SOCKET
//!
//! Prints "LUVMM-TAKER status=S fds=N devices=D" and exits 0 if the handover was granted.

use std::path::PathBuf;
use std::process::ExitCode;

use luvmm_vmm::api::client::VmmClient;
use luvmm_vmm::api::Endpoint;

fn main() -> ExitCode {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: handover-taker SOCKET");
        return ExitCode::from(2);
    };
    match VmmClient::new(&socket).handover() {
        Ok(handover) => {
            println!(
                "LUVMM-TAKER status={} fds={} devices={}",
                Endpoint::Handover.success_status(),
                handover.fds.len(),
                handover.manifest.passthrough.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let Some(status) = e.status() {
                println!("LUVMM-TAKER status={status} fds=0 devices=0");
            }
            eprintln!("handover-taker: {e}");
            ExitCode::FAILURE
        }
    }
}
