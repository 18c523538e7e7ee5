//! Plays a handover target that dies on the way: asks the luvmm behind SOCKET to hand its VM
//! over, takes the fds, and exits without confirming (the fds close with it). The source must
//! then still be able to resume the VM, devices and all.
//!
//!     handover-taker SOCKET
//!
//! Prints "LUVMM-TAKER status=S fds=N devices=D" and exits 0 if the handover was granted.

use std::path::PathBuf;
use std::process::ExitCode;

use luvmm_vmm::api::client;

fn main() -> ExitCode {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: handover-taker SOCKET");
        return ExitCode::from(2);
    };
    match client::request(
        &socket,
        "PUT",
        "/vm/handover",
        None,
        client::DEFAULT_TIMEOUT,
    ) {
        Ok(reply) => {
            let devices = serde_json::from_str::<serde_json::Value>(&reply.body)
                .ok()
                .and_then(|m| m["passthrough"].as_array().map(Vec::len))
                .unwrap_or(0);
            println!(
                "LUVMM-TAKER status={} fds={} devices={devices}",
                reply.status,
                reply.fds.len()
            );
            if reply.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("handover-taker: {e}");
            ExitCode::FAILURE
        }
    }
}
