//! Builds the guest payload from `guest/` with the repo's own script, so every test run uses a
//! payload made from the checked-in source.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for file in ["guest/payload.S", "guest/payload.ld", "guest/build.sh"] {
        println!("cargo:rerun-if-changed={file}");
    }
    let status = Command::new("bash")
        .arg(here.join("guest/build.sh"))
        .arg(&out)
        .status()
        .expect("cannot run bash for tests/guest/build.sh");
    assert!(
        status.success(),
        "tests/guest/build.sh failed: the payload needs binutils (as, ld): run bash tests/setup.sh"
    );
    println!(
        "cargo:rustc-env=LUVMM_PAYLOAD={}",
        out.join("payload.elf").display()
    );
}
