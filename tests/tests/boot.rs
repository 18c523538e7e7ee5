//! Booting the payload through both entry protocols, and refusing bad configurations.

use luvmm_tests::{field, lines_with, run_luvmm, TestDir, Vm};

fn boot_line(vm: &Vm) -> String {
    lines_with(&vm.serial, "LUVMM-BOOT").remove(0)
}

#[test]
fn boots_through_the_64_bit_linux_protocol() {
    let dir = TestDir::new("boot-linux64");
    let vm = Vm::boot(&dir, "vm", &["--boot", "linux64", "--memory-mib", "64"]);
    let line = boot_line(&vm);
    assert_eq!(field(&line, "proto"), Some("linux64"), "{line}");
    // 64 MiB less the legacy hole between the EBDA and 1 MiB, from the e820 map.
    assert_eq!(field(&line, "ram_mib"), Some("63"), "{line}");
    // By default every page from 2 MiB (below is the payload) to the end of RAM.
    let pages = (64 - 2) << 8;
    assert_eq!(field(&line, "fill_pages"), Some("15872"), "{line}");
    assert_eq!(
        field(&line, "cover"),
        Some("0x0000000000200000:15872"),
        "{line}"
    );
    let check = vm.check();
    assert!(check.ok, "{}", check.line);
    assert_eq!(check.pages, pages);
    vm.kill();

    // The command line may lower it, for speed.
    let vm = Vm::boot(
        &dir,
        "fewer",
        &[
            "--boot",
            "linux64",
            "--cmdline",
            "console=ttyS0 luvmm.fill_pages=300",
        ],
    );
    let line = boot_line(&vm);
    assert_eq!(
        field(&line, "cover"),
        Some("0x0000000000200000:300"),
        "{line}"
    );
    assert_eq!(vm.check().pages, 300);
}

#[test]
fn boots_through_pvh_and_auto_prefers_it() {
    let dir = TestDir::new("boot-pvh");
    for (name, boot) in [("pvh", "pvh"), ("auto", "auto")] {
        let vm = Vm::boot(&dir, name, &["--boot", boot]);
        let line = boot_line(&vm);
        assert_eq!(field(&line, "proto"), Some("pvh"), "{boot}: {line}");
        assert!(vm.check().ok);
        vm.kill();
    }
}

#[test]
fn config_file_with_two_regions_and_two_vcpus_boots() {
    let dir = TestDir::new("boot-config");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"vcpus": 2,
                "memory": [{{"gpa": 0, "size": 67108864}}, {{"gpa": 4294967296, "size": 33554432}}],
                "payload": "{}"}}"#,
            luvmm_tests::payload().display()
        ),
    )
    .unwrap();
    let vm = Vm::boot(&dir, "vm", &["--config", config.to_str().unwrap()]);
    let line = boot_line(&vm);
    // The guest sums both regions from its memory map: 63 MiB low + 32 MiB high.
    assert_eq!(field(&line, "ram_mib"), Some("95"), "{line}");
    // Both regions are covered, above 4 GiB too.
    assert_eq!(
        field(&line, "cover"),
        Some("0x0000000000200000:15872,0x0000000100000000:8192"),
        "{line}"
    );
    // The second vCPU was started by the guest and keeps its own heartbeat.
    let smp = luvmm_tests::wait_until("the guest's LUVMM-SMP line", || {
        lines_with(&vm.serial, "LUVMM-SMP").pop()
    });
    assert_eq!(field(&smp, "vcpus"), Some("2"), "{smp}");
    let status = vm.client().status().expect("GET /vm");
    assert_eq!(status.vcpus, 2);
    assert_eq!(status.memory.regions.len(), 2);
    let first = vm.check();
    assert!(first.ok, "{}", first.line);
    assert_eq!(first.pages, 15872 + 8192);
    let later = luvmm_tests::wait_until("two more ticks on every vCPU", || {
        let check = vm.check();
        check
            .heartbeats
            .iter()
            .zip(&first.heartbeats)
            .all(|(now, then)| *now >= then + 2)
            .then_some(check)
    });
    assert_eq!(later.heartbeats.len(), 2, "{}", later.line);
}

fn refused(args: &[&str], expected: &str) {
    let (status, stderr) = run_luvmm(args);
    assert!(!status.success(), "{args:?} was accepted");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

#[test]
fn bad_configurations_are_refused_with_the_field_named() {
    luvmm_tests::require_kvm();
    let payload = luvmm_tests::payload();
    let payload = payload.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--payload", payload, "--vcpus", "0"],
            "vcpus: must be at least 1",
        ),
        (
            &["--payload", payload, "--vcpus", "100000"],
            "exceeds this host's KVM limit",
        ),
        (
            &["--payload", payload, "--memory-mib", "0"],
            "memory[0].size: must not be 0",
        ),
        (
            &["--payload", "/nonexistent/payload.elf"],
            "payload: /nonexistent/payload.elf",
        ),
        (&[], "payload: no guest kernel given (--kernel FILE"),
        // One vocabulary: a mistyped serial word is refused, not taken for a file name.
        (
            &["--payload", payload, "--serial", "sink"],
            "\"sink\" is not stdout, none or a path",
        ),
        (
            &["--payload", payload, "--boot", "bios"],
            "unknown variant `bios`, expected one of `auto`, `linux64`, `pvh`",
        ),
        (
            &["--payload", payload, "--vfio-backend", "vfio"],
            "expected one of `auto`, `iommufd`, `legacy`",
        ),
    ];
    for (args, expected) in cases {
        let mut run = vec!["run"];
        run.extend_from_slice(args);
        refused(&run, expected);
    }

    let dir = TestDir::new("boot-bad-config");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let overlap = write(
        "overlap.json",
        format!(
            r#"{{"vcpus": 1, "memory": [{{"gpa": 0, "size": 67108864}}, {{"gpa": 4096, "size": 4096}}], "payload": "{payload}"}}"#
        ),
    );
    refused(
        &["run", "--config", &overlap],
        "memory[0] and memory[1] overlap",
    );
    let hole = write(
        "hole.json",
        format!(
            r#"{{"vcpus": 1, "memory": [{{"gpa": 0, "size": 67108864}}, {{"gpa": 3221225472, "size": 4096}}], "payload": "{payload}"}}"#
        ),
    );
    refused(&["run", "--config", &hole], "overlaps the MMIO hole");
    let unaligned = write(
        "unaligned.json",
        format!(
            r#"{{"vcpus": 1, "memory": [{{"gpa": 0, "size": 67109000}}], "payload": "{payload}"}}"#
        ),
    );
    refused(&["run", "--config", &unaligned], "memory[0].size");
    let typo = write("typo.json", r#"{"vcpus": 1, "memroy": []}"#.to_string());
    refused(&["run", "--config", &typo], "memroy");
    // A wrong type names its field, in JSON's words.
    let two = write(
        "two.json",
        format!(r#"{{"vcpus": "two", "payload": "{payload}"}}"#),
    );
    refused(
        &["run", "--config", &two],
        "vcpus: expected a number, found string \"two\"",
    );
    let list = write("list.json", "[1]".to_string());
    refused(
        &["run", "--config", &list],
        "a config is a JSON object ({\"vcpus\": 1, ...}), not an array",
    );
    // A payload whose segments reach past guest RAM is refused before it is loaded.
    let big = dir.join("big.elf");
    std::fs::write(&big, elf_reaching(64 << 20)).unwrap();
    refused(
        &[
            "run",
            "--payload",
            big.to_str().unwrap(),
            "--memory-mib",
            "16",
        ],
        "does not fit in guest RAM: its segments reach 65 MiB, the VM has 16 MiB",
    );
}

/// A minimal x86-64 ELF with one loadable segment at 1 MiB of `memsz` bytes (8 in the file).
fn elf_reaching(memsz: u64) -> Vec<u8> {
    const LOAD_AT: u64 = 0x10_0000;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_AT.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [120, LOAD_AT, LOAD_AT, 8, memsz, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&[0xf4; 8]); // hlt
    elf
}

/// More vCPUs than host CPUs boots, with a warning.
#[test]
fn more_vcpus_than_host_cpus_boot_with_a_warning() {
    let dir = TestDir::new("boot-overcommit");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let vcpus = (cpus + 1).to_string();
    let log = dir.join("vm.err");
    let vm = Vm::boot_logging(
        &dir,
        "vm",
        &["--vcpus", &vcpus],
        std::fs::File::create(&log).unwrap(),
    );
    assert!(vm.check().ok);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "{vcpus} vCPUs on {cpus} host CPUs: they take turns"
        )),
        "{text}"
    );
}

/// Guest RAM asks for transparent huge pages unless `--thp off`, and gets them only where the
/// host's shmem THP allows: with `never` or `deny` luvmm says so and RAM stays in small pages;
/// otherwise the memfd mappings carry `MADV_HUGEPAGE` (`hg` in the VMM's smaps).
#[test]
fn guest_ram_asks_for_huge_pages_where_the_host_allows_them() {
    let dir = TestDir::new("boot-thp");
    let host = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let refused = !["[always]", "[within_size]", "[advise]", "[force]"]
        .iter()
        .any(|word| host.contains(word));
    let said = "guest RAM in small pages";
    for (name, flags, asked) in [
        ("default", &[][..], true),
        ("off", &["--thp", "off"], false),
    ] {
        let log = dir.join(&format!("{name}.err"));
        let stderr = std::fs::File::create(&log).unwrap();
        let vm = Vm::boot_logging(&dir, name, flags, stderr);
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm.pid())).unwrap();
        vm.kill();
        let log = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            log.contains(said),
            asked && refused,
            "{name}, host {host:?}: {log}"
        );
        let advised = smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "hg"));
        assert_eq!(advised, asked && !refused, "{name}, host {host:?}");
    }
}
