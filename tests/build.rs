//! Builds the guest payload from `guest/` and the Linux guest's judge from `guest/linux/` with
//! the repo's own scripts, so every test run uses binaries made from the checked-in source.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for file in [
        "guest/payload.S",
        "guest/payload.ld",
        "guest/build.sh",
        "guest/linux/judge.c",
        "guest/linux/build-judge.sh",
    ] {
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
    let judge = out.join("judge");
    let status = Command::new("bash")
        .arg(here.join("guest/linux/build-judge.sh"))
        .arg(&judge)
        .status()
        .expect("cannot run bash for tests/guest/linux/build-judge.sh");
    assert!(
        status.success(),
        "tests/guest/linux/build-judge.sh failed: the judge needs gcc and a static libc: run bash tests/setup.sh"
    );
    println!("cargo:rustc-env=LUVMM_JUDGE={}", judge.display());
}
