/*
 * luvmm test payload: a tiny x86-64 guest that proves nothing was lost across a save/restore.
 *
 * Entry points:
 *   linux64_entry  64-bit Linux boot protocol (ELF e_entry): long mode, RSI = boot_params.
 *   pvh_entry      PVH (XEN_ELFNOTE_PHYS32_ENTRY note): 32-bit protected mode, paging off,
 *                  EBX = hvm_start_info.
 * Either way it then maps the first MAP_LIMIT (64 GiB) of physical memory, identity, itself.
 *
 * After boot it reads the RAM ranges from the e820 map or the PVH memory map and writes one
 * seeded 64-bit word into every 4 KiB page of every range, from 2 MiB up (below is the
 * payload itself); "luvmm.fill_pages=N" on the command line covers only the first N pages,
 * in address order, for speed. It prints
 *     LUVMM-BOOT proto=<linux64|pvh> ram_mib=R fill_pages=N seed=0x... cover=0xA:P,0xB:Q
 * where cover lists each range's first address and how many of its pages are covered.
 * It then starts every other vCPU (INIT, SIPI, SIPI to all but itself): each runs its own
 * x2APIC timer and heartbeat and halts between ticks. Once no new vCPU has come up for
 * AP_QUIET_TICKS ticks it prints
 *     LUVMM-SMP vcpus=N
 * With "luvmm.end=1" it powers the VM off (ACPI S5) once booted, "=2" resets it through the ACPI
 * reset register, "=3" through the i8042.
 * With "luvmm.intx=1" it leaves MSI off and routes the function's INTx line through the IOAPIC
 * instead (irq=intx). With "luvmm.dma_outside=1" it then also has each device DMA to an IOVA outside guest RAM,
 * which the IOMMU must block, and prints "LUVMM-DEV dma_outside sent bdf=...". After the scan
 * it prints "LUVMM-DEV scan done devices=N".
 * It then sleeps in HLT between x2APIC timer ticks (10 Hz) that bump a heartbeat counter.
 * After each wake-up it reads the luvmm guest-control port; bit 0 set means "check now", and
 * it re-reads every filled page and prints one of
 *     LUVMM-CHECK ok pages=N heartbeat=H seed=0x... checks=C vcpus=N tick_gap_tsc=G tick_tsc=T
 *         tick_back_tsc=B heartbeats=H0,H1,...                    (one line)
 *     LUVMM-CHECK LOST first_bad_gpa=0x... expected=0x... found=0x...
 * G is the largest TSC gap between two of the BSP's ticks since the previous check, T the TSC
 * per tick (100 ms) over its first 10 ticks: G / T * 100 ms is the longest the guest's own
 * clock saw it stop, e.g. across a save and restore; B is the most its TSC went back between
 * two ticks (0: it never did).
 * Any CPU exception prints LUVMM-FAULT vector=V rip=0x... and halts for good.
 *
 * Before sleeping it scans PCI bus 0 for QEMU edu devices; for each it sizes and places BAR 0,
 * enables memory decoding and bus mastering, checks the liveness register, enables MSI (and
 * disables and enables it once more, so a re-enable is exercised), copies
 * 2048 bytes RAM -> device -> RAM by DMA, waits for the completion interrupt, and prints
 *     LUVMM-DEV ok bdf=00:SS.0 dma=ok irq=msi dma_gpa=0x... dma_word=0x...
 *     LUVMM-DEV FAIL bdf=00:SS.0 reason=...
 * For each QEMU NVMe controller (1b36:0010) it places BAR 0 below 4 GiB, programs MSI-X
 * vector 0 (masked) and enables MSI-X, brings the controller up with an admin queue pair and
 * sends IDENTIFY CONTROLLER. The completion must not interrupt while the vector is masked but
 * show in the pending-bit array; unmasking must deliver it, and leave nothing pending. It then checks the completion and
 * the identify data the device wrote (vendor 1b36, serial "luvm...") and prints
 *     LUVMM-DEV ok bdf=00:SS.0 dma=ok irq=msix dma_gpa=0x... dma_word=0x...
 * NVMe always uses MSI-X, with or without "luvmm.intx=1".
 *
 * The guest-control port word has one bit per request: 1 check (above), 2 devices, 4
 * irq_in_flight, 8 irq_landed. "devices" drives every device found at boot again, as it was
 * left: a new DMA round trip with its interrupt through each edu device (which must still hold
 * the identity the guest wrote to its liveness register at boot, from the seed and its slot), and a new IDENTIFY at
 * the tail of the NVMe admin queue set up at boot (no re-initialisation), completed by MSI-X:
 *     LUVMM-ROUND ok n=R bdf=00:SS.0 dma=ok irq=msi id=ok  (or id=LOST found=0x...)
 *     LUVMM-ROUND ok n=R bdf=00:SS.0 nvme=ok irq=msix sq_slot=K
 *     LUVMM-ROUND done n=R devices=D         (or LUVMM-ROUND FAIL ... reason=...)
 * "irq_in_flight" masks NVMe vector 0 and sends a command (its completion must then be
 * pending), prints "LUVMM-INFLIGHT armed nvme_held=N edu_in_flight=M", starts an edu DMA with
 * its completion interrupt (edu completes ~100 ms later) and at once writes 1 to the port: the
 * VMM pauses the guest, so that interrupt is raised while it is paused (or moving).
 * "irq_landed" then requires the edu DMA done with its interrupt delivered, and the NVMe
 * message still pending and delivered on unmask:
 *     LUVMM-INFLIGHT ok bdf=00:SS.0 edu dma=ok irq=msi
 *     LUVMM-INFLIGHT ok bdf=00:SS.0 nvme pending=kept irq=msix
 */

    .set SERIAL,              0x3f8
    .set SERIAL_LSR,          0x3fd
    .set CONTROL_PORT,        0x600
    .set FILL_BASE,           0x200000
    .set MAP_GIB,             64            /* identity-mapped GiB: one page directory each */
    .set MAP_LIMIT,           MAP_GIB << 30
    .set MAX_RANGES,          16            /* RAM ranges the pattern covers */
    .set MAX_CPUS,            8             /* vCPUs with a stack and a heartbeat */
    .set TRAMPOLINE,          0x10000       /* real-mode AP entry: SIPI vector 0x10 */
    .set AP_QUIET_TICKS,      5
    .set CALIBRATION_TICKS,   10            /* the BSP's ticks its TSC per tick is averaged over */
    .set TIMER_VECTOR,        32
    .set SPURIOUS_VECTOR,     0xff
    .set DEV_VECTOR,          0x41
    .set NVME_VECTOR,         0x42
    .set NVME_BAR,            0xf0000000    /* in the VMM's 32-bit PCI window, above its BARs */
    .set NVME_ASQ,            0x1b0000      /* admin submission queue, 8 entries */
    .set NVME_ACQ,            0x1b1000      /* admin completion queue, 8 entries */
    .set NVME_IDENTIFY,       0x1b2000      /* IDENTIFY CONTROLLER data */
    .set NVME_SERIAL_WORD,    0x6d76756c    /* "luvm", the start of the bed's serial number */
    .set MMIO_READS,          1000
    .set MAX_EDU,             8             /* edu devices remembered for rounds */
    .set DMA_OUTSIDE_IOVA,    0x0f000000    /* 240 MiB: below edu's 28-bit mask, above guest RAM */
    .set TICK_COUNT,          100000000     /* 100 ms: KVM's APIC timer counts at 1 GHz */
    .set PVH_MAGIC,           0x336ec578
    .set ERRCODE_VECTORS,     0x60227d00    /* 8, 10-14, 17, 21, 29, 30 push an error code */

/* Flat data segment 0x10 of either GDT in every data segment register; no stack needed. */
    .macro load_data_segments
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    .endm

/* ---------------------------------------------------------------- entry points */
    .section .text.boot, "ax"
    .code64
    .globl linux64_entry
linux64_entry:
    cli
    movq %rsi, boot_info(%rip)
    movl $1, protocol(%rip)
    jmp common64

    .code32
pvh_entry:
    cli
    movl %ebx, boot_info
    movl $2, protocol
    movl $stack_top, %esp           /* PVH leaves the stack pointer undefined */
    call build_page_tables
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $common64

/* Identity map of the first 4 GiB with 2 MiB pages; the top GiB (PCI MMIO, APIC) uncached.
 * The PVH entry's 32-bit version; build_page_tables_64 is the same for the Linux entry. */
build_page_tables:
    movl $pdpt, %eax
    orl $3, %eax
    movl %eax, pml4
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $pd, %eax
    orl $3, %eax
    movl %eax, pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present, writable, 2 MiB page */
    cmpl $1536, %ecx
    jb 3f
    orl $0x18, %eax                 /* PWT | PCD above 3 GiB */
3:  movl %eax, pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    ret

/* ---------------------------------------------------------------- common 64-bit path */
    .code64
common64:
    lgdt gdt_ptr(%rip)
    load_data_segments
    leaq stack_top(%rip), %rsp
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  call build_page_tables_64
    leaq pml4(%rip), %rax
    movq %rax, %cr3
    call setup_idt
    lidt idt_ptr(%rip)
    call read_boot_info
    call parse_cmdline
    call clamp_fill_pages
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movabsq $0x9e3779b97f4a7c15, %rdx
    xorq %rdx, %rax
    orq $1, %rax
    movq %rax, seed(%rip)
    xorl %esi, %esi
    call walk_pages
    call print_boot_line
    call start_timer
    sti
    call start_aps
    call pci_devices
    leaq str_scan_done(%rip), %rsi
    call puts
    call put_dec
    call newline
    call end_if_asked
main_loop:
    hlt
    movw $CONTROL_PORT, %dx
    inl %dx, %eax
    movl %eax, requests(%rip)
    testl $1, %eax                  /* check */
    jz 1f
    call run_check
1:  testl $2, requests(%rip)        /* devices */
    jz 2f
    call devices_round
2:  testl $4, requests(%rip)        /* irq_in_flight */
    jz 3f
    call irq_in_flight
3:  testl $8, requests(%rip)        /* irq_landed */
    jz main_loop
    call irq_landed
    jmp main_loop

/* Identity map of the first MAP_LIMIT with 2 MiB pages, the GiB below 4 GiB (PCI MMIO,
 * APIC) uncached; written in place over the PVH entry's 4 GiB map, which it extends. */
build_page_tables_64:
    leaq pdpt(%rip), %rax
    orq $3, %rax
    movq %rax, pml4(%rip)
    leaq pdpt(%rip), %rdi
    leaq pd(%rip), %rax
    orq $3, %rax
    movl $MAP_GIB, %ecx
1:  movq %rax, (%rdi)
    addq $8, %rdi
    addq $4096, %rax
    decl %ecx
    jnz 1b
    leaq pd(%rip), %rdi
    xorl %ecx, %ecx
2:  movq %rcx, %rax
    shlq $21, %rax
    orq $0x83, %rax
    cmpl $1536, %ecx
    jb 3f
    cmpl $2048, %ecx
    jae 3f
    orq $0x18, %rax
3:  movq %rax, (%rdi,%rcx,8)
    incl %ecx
    cmpl $(MAP_GIB * 512), %ecx
    jb 2b
    ret

/* ---------------------------------------------------------------- boot information */
read_boot_info:
    movq boot_info(%rip), %rbx
    cmpl $1, protocol(%rip)
    jne 1f
    movl 0x228(%rbx), %eax          /* boot_params.hdr.cmd_line_ptr */
    movq %rax, cmdline_ptr(%rip)
    movzbl 0x1e8(%rbx), %ecx        /* boot_params.e820_entries */
    leaq 0x2d0(%rbx), %rsi          /* boot_params.e820_table */
    movl $20, %r8d
    jmp 2f
1:  cmpl $PVH_MAGIC, (%rbx)
    je 3f
    leaq str_bad_pvh(%rip), %rsi
    call puts
    jmp halt_forever
3:  movq 24(%rbx), %rax             /* hvm_start_info.cmdline_paddr */
    movq %rax, cmdline_ptr(%rip)
    movl 48(%rbx), %ecx             /* memmap_entries */
    movq 40(%rbx), %rsi             /* memmap_paddr */
    movl $24, %r8d
2:  xorl %r9d, %r9d
    leaq ram_ranges(%rip), %rdi
    testl %ecx, %ecx
    jz 6f
4:  cmpl $1, 16(%rsi)               /* usable RAM */
    jne 5f
    movq 8(%rsi), %rax
    addq %rax, %r9
    movq (%rsi), %rdx               /* [max(base, FILL_BASE), min(end, MAP_LIMIT)), in pages */
    addq %rdx, %rax
    movq $FILL_BASE, %r10
    cmpq %r10, %rdx
    cmovbq %r10, %rdx
    movabsq $MAP_LIMIT, %r10
    cmpq %r10, %rax
    cmovaq %r10, %rax
    addq $4095, %rdx
    andq $-4096, %rdx
    andq $-4096, %rax
    cmpq %rax, %rdx
    jae 5f
    cmpl $MAX_RANGES, ram_range_count(%rip)
    jae 5f
    movq %rdx, (%rdi)
    movq %rax, 8(%rdi)
    addq $16, %rdi
    incl ram_range_count(%rip)
    subq %rdx, %rax
    shrq $12, %rax
    addq %rax, ram_pages(%rip)
5:  addq %r8, %rsi
    decl %ecx
    jnz 4b
6:  movq %r9, ram_bytes(%rip)
    ret

parse_cmdline:
    leaq str_fill_key(%rip), %rdi
    call cmdline_value
    jc 1f
    movq %rax, fill_pages(%rip)
1:  leaq str_dma_outside_key(%rip), %rdi
    call cmdline_value
    jc 2f
    movq %rax, dma_outside(%rip)
2:  leaq str_intx_key(%rip), %rdi
    call cmdline_value
    jc 3f
    movq %rax, use_intx(%rip)
3:  leaq str_end_key(%rip), %rdi
    call cmdline_value
    jc 4f
    movq %rax, end_request(%rip)
4:  ret

/*
 * end_if_asked: luvmm.end=1 powers the VM off through the ACPI sleep control register (S5 with
 * SLP_EN), 2 resets it through the ACPI reset register, 3 through the i8042; then halts.
 */
end_if_asked:
    movq end_request(%rip), %rax
    cmpq $1, %rax
    jne 1f
    movw $0x3c0, %dx
    movb $0x34, %al
    outb %al, %dx
    jmp 4f
1:  cmpq $2, %rax
    jne 2f
    movw $0x3c1, %dx
    movb $0x06, %al
    outb %al, %dx
    jmp 4f
2:  cmpq $3, %rax
    jne 3f
    movb $0xfe, %al
    outb %al, $0x64
    jmp 4f
3:  ret
4:  cli
5:  hlt
    jmp 5b

/* cmdline_value: rdi = "key=" -> rax = its decimal value, CF clear; CF set if absent */
cmdline_value:
    movq cmdline_ptr(%rip), %rsi
    testq %rsi, %rsi
    jz 9f
1:  cmpb $0, (%rsi)
    je 9f
    movq %rdi, %r8
    movq %rsi, %rbx
2:  movb (%r8), %al
    testb %al, %al
    jz 3f
    cmpb (%rbx), %al
    jne 4f
    incq %r8
    incq %rbx
    jmp 2b
4:  incq %rsi
    jmp 1b
3:  xorl %eax, %eax
5:  movzbl (%rbx), %ecx
    subl $'0', %ecx
    cmpl $9, %ecx
    ja 6f
    imulq $10, %rax
    addq %rcx, %rax
    incq %rbx
    jmp 5b
6:  clc
    ret
9:  stc
    ret

/* fill_pages = min(fill_pages, every page of the RAM ranges) */
clamp_fill_pages:
    movq ram_pages(%rip), %rax
    cmpq fill_pages(%rip), %rax
    jae 1f
    movq %rax, fill_pages(%rip)
1:  ret

/* ---------------------------------------------------------------- the pattern */
/* walk_pages: esi = 0 writes the pattern, 1 compares it. Visits the first fill_pages pages of
 * the RAM ranges in address order; the word at page address A is seed ^ (A * golden).
 * Returns rdi = the first page that differs (0 if none) and rax = its expected word. */
walk_pages:
    movq fill_pages(%rip), %rcx
    movq seed(%rip), %r10
    movabsq $0x9e3779b97f4a7c15, %r11
    leaq ram_ranges(%rip), %r8
    movl ram_range_count(%rip), %r9d
1:  testl %r9d, %r9d
    jz 5f
    movq (%r8), %rdi
    movq 8(%r8), %rdx
2:  cmpq %rdx, %rdi
    jae 4f
    testq %rcx, %rcx
    jz 5f
    movq %rdi, %rax
    imulq %r11, %rax
    xorq %r10, %rax
    testl %esi, %esi
    jnz 3f
    movq %rax, (%rdi)
    jmp 6f
3:  cmpq %rax, (%rdi)
    jne 7f
6:  addq $4096, %rdi
    decq %rcx
    jmp 2b
4:  addq $16, %r8
    decl %r9d
    jmp 1b
5:  xorl %edi, %edi
7:  ret

run_check:
    incq checks(%rip)
    movl $1, %esi
    call walk_pages
    testq %rdi, %rdi
    jnz 2f
    leaq str_check_ok(%rip), %rsi
    call puts
    movq fill_pages(%rip), %rax
    call put_dec
    leaq str_heartbeat(%rip), %rsi
    call puts
    movq heartbeat(%rip), %rax
    call put_dec
    leaq str_seed(%rip), %rsi
    call puts
    movq seed(%rip), %rax
    call put_hex
    leaq str_checks(%rip), %rsi
    call puts
    movq checks(%rip), %rax
    call put_dec
    call put_vcpus
    call put_tick_clock
    leaq str_heartbeats(%rip), %rsi
    call puts
    xorl %ebx, %ebx
    leaq heartbeats(%rip), %rcx
1:  movq (%rcx,%rbx,8), %rax
    call put_dec
    incl %ebx
    cmpl vcpus_up(%rip), %ebx
    jae newline
    movb $',', %al
    call putc
    jmp 1b
2:  movq %rax, %rbx
    leaq str_check_lost(%rip), %rsi
    movq %rdi, %rax
    call put_key_hex
    leaq str_expected(%rip), %rsi
    movq %rbx, %rax
    call put_key_hex
    leaq str_found(%rip), %rsi
    movq (%rdi), %rax
    call put_key_hex
    jmp newline

/* put_tick_clock: " tick_gap_tsc=G tick_tsc=T tick_back_tsc=B": the largest TSC gap between
 * two of the BSP's ticks since the last check, the TSC per tick (TICK_COUNT, 100 ms) over its
 * first CALIBRATION_TICKS ticks, which turns G into time by the guest's own clocks, and the
 * most its TSC went back from one tick to the next since the last check (0: never). G and B
 * are cleared. */
put_tick_clock:
    cli
    movq tick_gap_max(%rip), %r8
    movq $0, tick_gap_max(%rip)
    movq tick_back_max(%rip), %r9
    movq $0, tick_back_max(%rip)
    movq tick_tsc_cal(%rip), %rax
    sti
    testq %rax, %rax
    jz 1f                           /* not calibrated yet: 0 */
    subq tick_tsc_first(%rip), %rax
    movl $CALIBRATION_TICKS, %ecx
    xorl %edx, %edx
    divq %rcx
1:  leaq str_tick_gap(%rip), %rsi
    call puts
    xchgq %rax, %r8
    call put_dec
    leaq str_tick_tsc(%rip), %rsi
    call puts
    movq %r8, %rax
    call put_dec
    leaq str_tick_back(%rip), %rsi
    call puts
    movq %r9, %rax
    negq %rax
    jmp put_dec

print_boot_line:
    leaq str_boot(%rip), %rsi
    call puts
    leaq str_linux64(%rip), %rsi
    cmpl $1, protocol(%rip)
    je 1f
    leaq str_pvh(%rip), %rsi
1:  call puts
    leaq str_ram(%rip), %rsi
    call puts
    movq ram_bytes(%rip), %rax
    shrq $20, %rax
    call put_dec
    leaq str_fill(%rip), %rsi
    call puts
    movq fill_pages(%rip), %rax
    call put_dec
    leaq str_seed(%rip), %rsi
    call puts
    movq seed(%rip), %rax
    call put_hex
    leaq str_cover(%rip), %rsi      /* each range: its start and how many pages are covered */
    call puts
    movq fill_pages(%rip), %rcx
    leaq ram_ranges(%rip), %r8
    movl ram_range_count(%rip), %r9d
1:  testl %r9d, %r9d
    jz newline
    movq (%r8), %rax
    call put_hex
    movb $':', %al
    call putc
    movq 8(%r8), %rax
    subq (%r8), %rax
    shrq $12, %rax
    cmpq %rcx, %rax
    cmovaq %rcx, %rax
    subq %rax, %rcx
    call put_dec
    addq $16, %r8
    decl %r9d
    jz newline
    movb $',', %al
    call putc
    jmp 1b

/* put_vcpus: prints " vcpus=N" */
put_vcpus:
    leaq str_vcpus(%rip), %rsi
    call puts
    movl vcpus_up(%rip), %eax
    jmp put_dec

/* ---------------------------------------------------------------- the other vCPUs */
/* start_aps: copies the real-mode trampoline to TRAMPOLINE, sends INIT, SIPI, SIPI to every
 * other vCPU, and waits in hlt until none has come up for AP_QUIET_TICKS ticks. Needs the
 * timer running and interrupts on. */
start_aps:
    movl $1, vcpus_up(%rip)
    leaq ap_trampoline(%rip), %rsi
    movl $TRAMPOLINE, %edi
    movl $(ap_trampoline_end - ap_trampoline), %ecx
    rep movsb
    movl $0x830, %ecx               /* x2APIC ICR, to all but self: */
    xorl %edx, %edx
    movl $0x000c4500, %eax          /* INIT, level assert */
    wrmsr
    movl $(0x000c4600 | (TRAMPOLINE >> 12)), %eax  /* STARTUP, twice as the MP spec says */
    wrmsr
    wrmsr
    movq heartbeat(%rip), %r9       /* tick at which the count last changed */
    movl vcpus_up(%rip), %r10d
1:  hlt
    movl vcpus_up(%rip), %eax
    cmpl %eax, %r10d
    je 2f
    movl %eax, %r10d
    movq heartbeat(%rip), %r9
2:  movq heartbeat(%rip), %rax
    subq %r9, %rax
    cmpq $AP_QUIET_TICKS, %rax
    jb 1b
    leaq str_smp(%rip), %rsi
    call puts
    call put_vcpus
    jmp newline

/* The AP entry, copied to TRAMPOLINE: real mode at CS = TRAMPOLINE >> 4, to protected mode
 * with its own GDT, then long mode on the BSP's page tables, then ap_entry64. */
    .code16
ap_trampoline:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(TRAMPOLINE + ap_protected - ap_trampoline)
    .code32
ap_protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax           /* PG */
    movl %eax, %cr0
    ljmp $0x18, $ap_entry64
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
    .quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
ap_gdt_end:
ap_gdt_ptr:
    .word ap_gdt_end - ap_gdt - 1
    .long TRAMPOLINE + ap_gdt - ap_trampoline
ap_trampoline_end:
    .code64

/* ap_entry64: in long mode, on no stack yet. Takes the stack of its x2APIC id, starts its
 * timer, counts itself up, and halts between ticks for good. */
ap_entry64:
    lgdt gdt_ptr(%rip)
    load_data_segments
    movl $0x1b, %ecx                /* x2APIC on, to read the id */
    rdmsr
    orl $0xc00, %eax
    wrmsr
    movl $0x802, %ecx               /* x2APIC ID */
    rdmsr
    cmpl $MAX_CPUS, %eax
    jae ap_park
    shlq $12, %rax                  /* stack: the top of ap_stacks[id] */
    leaq ap_stacks+4096(%rip), %rsp
    addq %rax, %rsp
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  lidt idt_ptr(%rip)
    call start_timer
    lock incl vcpus_up(%rip)
    sti
2:  hlt
    jmp 2b
ap_park:
    cli
    hlt
    jmp ap_park

/* ---------------------------------------------------------------- PCI and the edu device */
/* pci_address: edi = slot, esi = register -> selects it on port 0xcf8; clobbers eax, edx */
pci_address:
    movl %edi, %eax
    shll $11, %eax
    orl %esi, %eax
    orl $0x80000000, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
    ret

/* pci_read32: edi = slot, esi = register -> eax; clobbers edx */
pci_read32:
    call pci_address
    movw $0xcfc, %dx
    inl %dx, %eax
    ret

/* pci_write32: edi = slot, esi = register, ecx = value; clobbers eax, edx */
pci_write32:
    call pci_address
    movl %ecx, %eax
    movw $0xcfc, %dx
    outl %eax, %dx
    ret

/* pci_enable_memory_and_master: edi = slot. Sets the command register's memory space and bus
 * master bits; clobbers eax, ecx, edx, esi */
pci_enable_memory_and_master:
    movl $0x04, %esi
    call pci_read32
    andl $0xffff, %eax
    orl $0x6, %eax
    movl %eax, %ecx
    jmp pci_write32

/* pci_find_cap: edi = slot, esi = capability id -> eax = its offset, 0 if absent;
 * clobbers ecx, edx, r8 */
pci_find_cap:
    movl %esi, %r8d
    movl $0x34, %esi
    call pci_read32
    andl $0xfc, %eax
1:  testl %eax, %eax
    jz 2f
    movl %eax, %ecx
    movl %eax, %esi
    call pci_read32
    cmpb %r8b, %al
    je 3f
    shrl $8, %eax
    andl $0xfc, %eax
    jmp 1b
3:  movl %ecx, %eax
2:  ret

/* Scans bus 0 for QEMU edu devices (1234:11e8) and NVMe controllers (1b36:0010) and tests
 * each. */
pci_devices:
    pushq %rbx
    pushq %r12
    xorl %r12d, %r12d
    movl $1, %ebx
1:  movl %ebx, %edi
    xorl %esi, %esi
    call pci_read32
    cmpl $0x00101b36, %eax
    jne 3f
    movl %ebx, %edi
    call nvme_test
    incl %r12d
    jmp 2f
3:  cmpl $0x11e81234, %eax
    jne 2f
    movl %ebx, %edi
    movl %r12d, %esi
    call edu_test
    incl %r12d
2:  incl %ebx
    cmpl $32, %ebx
    jb 1b
    movl %r12d, %eax                /* devices found */
    popq %r12
    popq %rbx
    ret

/* wait_bits: waits in hlt until ((%rdi) & esi) is non-zero (edx = 1) or zero (edx = 0), or
 * 50 timer ticks pass; eax = 1 if the condition was met */
wait_bits:
    movq heartbeat(%rip), %r8
    addq $50, %r8
1:  xorl %eax, %eax
    testl %esi, (%rdi)
    setnz %al
    cmpl %edx, %eax
    je 2f
    cmpq %r8, heartbeat(%rip)
    jae 3f
    hlt
    jmp 1b
2:  movl $1, %eax
    ret
3:  xorl %eax, %eax
    ret

/* wait_count: rdi = an interrupt counter. Waits until it is non-zero, or 50 timer ticks pass;
 * eax = 1 if it became non-zero */
wait_count:
    movl $0xffffffff, %esi
    movl $1, %edx
    jmp wait_bits

/* edu_idle: waits until the DMA command register's busy bit clears (r12 = BAR); eax = 1 if so */
edu_idle:
    leaq 0x98(%r12), %rdi
    movl $1, %esi
    xorl %edx, %edx
    jmp wait_bits

/* edu_test: edi = slot, esi = device index. Sizes and places BAR 0, enables memory and bus
 * mastering, checks the ID and liveness registers, enables MSI (on, off, on), copies 2048 bytes
 * RAM -> device -> RAM by DMA, waits for the device's interrupt, and compares. */
edu_test:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movl %edi, %ebx
    movl %esi, %r15d
    movl %ebx, %edi                 /* BAR sizing handshake */
    movl $0x10, %esi
    call pci_read32
    movl %eax, %r12d
    movl $0xffffffff, %ecx
    call pci_write32
    call pci_read32
    andl $0xfffffff0, %eax
    negl %eax
    movl %eax, %r13d                /* size */
    movl %r12d, %ecx                /* keep the VMM's placement, or pick one */
    andl $0xfffffff0, %ecx
    jnz 1f
    movl %r15d, %ecx
    shll $24, %ecx
    addl $0xc0000000, %ecx
1:  movl %ecx, %r12d
    call pci_write32
    call pci_enable_memory_and_master
    movq %r12, dev_bar(%rip)
    movl edu_count(%rip), %eax      /* remembered for later rounds */
    cmpl $MAX_EDU, %eax
    jae 6f
    leaq edu_bars(%rip), %rcx
    movq %r12, (%rcx,%rax,8)
    leaq edu_slots(%rip), %rcx
    movl %ebx, (%rcx,%rax,4)
    incl edu_count(%rip)
6:
    movl 0x00(%r12), %eax           /* identification: 0x010000ed */
    cmpb $0xed, %al
    jne edu_fail_id
    movl $0x12345678, 0x04(%r12)    /* liveness: reads back inverted */
    movl 0x04(%r12), %eax
    cmpl $0xedcba987, %eax
    jne edu_fail_live
    call edu_identity               /* the device keeps its identity's inverse from now on */
    movl %eax, 0x04(%r12)
    call edu_time_mmio
    cmpq $0, use_intx(%rip)
    jne 4f
    call edu_enable_msi
    jmp 5f
4:  call edu_route_intx
5:  call edu_dma_start              /* a copy RAM -> device -> RAM, with its interrupt */
    testl %eax, %eax
    jz edu_fail_dma
    call edu_wait_done
    testq %rax, %rax
    movq %rax, %rsi
    jnz dev_fail
    call edu_irq_word
    movq dma_dst(%rip), %rdi
    call put_dev_ok
    cmpq $0, dma_outside(%rip)
    je dev_done
    movl $0x40000, 0x80(%r12)       /* DMA into an IOVA no guest RAM backs: the IOMMU must block it */
    movl $DMA_OUTSIDE_IOVA, 0x88(%r12)
    movl $2048, 0x90(%r12)
    movl $3, 0x98(%r12)
    call edu_idle
    leaq str_dma_outside(%rip), %rsi
    call puts
    call put_bdf
    call newline
    jmp dev_done
edu_fail_id:
    leaq str_fail_id(%rip), %rsi
    jmp dev_fail
edu_fail_live:
    leaq str_fail_live(%rip), %rsi
    jmp dev_fail
edu_fail_dma:
    leaq str_fail_dma(%rip), %rsi
/* dev_fail: rsi = reason; prints the FAIL line and returns from edu_test or nvme_test */
dev_fail:
    movq %rsi, %rax
    leaq str_dev_fail(%rip), %rsi
    call put_fail
dev_done:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* edu_enable_msi: ebx = slot. Finds the MSI capability, programs vector DEV_VECTOR to APIC 0
 * and enables it, disables it and enables it again; eax = 1 if found. */
edu_enable_msi:
    movl %ebx, %edi
    movl $0x05, %esi
    call pci_find_cap
    testl %eax, %eax
    jz 4f
    movl %eax, %r13d                /* capability offset */
    movl %eax, %esi
    call pci_read32
    movl %eax, %r14d                /* id, next, control */
    leal 4(%r13), %esi
    movl $0xfee00000, %ecx
    call pci_write32
    leal 8(%r13), %esi              /* data at +8, or +12 after a high address word */
    testl $0x800000, %r14d
    jz 3f
    xorl %ecx, %ecx
    call pci_write32
    leal 12(%r13), %esi
3:  movl $DEV_VECTOR, %ecx
    call pci_write32
    movl %r13d, %esi
    movl %r14d, %ecx
    orl $0x10000, %ecx              /* control: MSI enable */
    call pci_write32
    movl %r13d, %esi                /* disable and enable again, as a driver reloading does: */
    movl %r14d, %ecx                /* the DMA interrupt that follows must still arrive */
    andl $0xfffeffff, %ecx
    call pci_write32
    movl %r13d, %esi
    movl %r14d, %ecx
    orl $0x10000, %ecx
    call pci_write32
    movl $1, %eax
    ret
4:  xorl %eax, %eax
    ret

/* edu_time_mmio: r12 = BAR. Times MMIO_READS reads of the ID register with rdtsc and prints
 * "LUVMM-DEV mmio bdf=00:SS.0 reads=N cycles_per_read=C": a trapped BAR exits every time,
 * a directly mapped one never does. */
edu_time_mmio:
    pushq %r13
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r13
    movl $MMIO_READS, %ecx
1:  movl 0x00(%r12), %eax
    decl %ecx
    jnz 1b
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %r13, %rax
    xorl %edx, %edx
    movl $MMIO_READS, %ecx
    divq %rcx
    movq %rax, %r13
    leaq str_mmio(%rip), %rsi
    call puts
    call put_bdf
    leaq str_mmio_reads(%rip), %rsi
    call puts
    movl $MMIO_READS, %eax
    call put_dec
    leaq str_mmio_cycles(%rip), %rsi
    call puts
    movq %r13, %rax
    call put_dec
    call newline
    popq %r13
    ret

/* edu_route_intx: ebx = slot. Routes the function's INTx line (config 0x3c) through the IOAPIC
 * to DEV_VECTOR, level-triggered, active high, to APIC 0. */
edu_route_intx:
    movl %ebx, %edi
    movl $0x3c, %esi
    call pci_read32
    andl $0xff, %eax                /* the line the VMM wired */
    leal 0x10(,%rax,2), %ecx        /* redirection entry: registers 0x10 + 2n, 0x11 + 2n */
    movl $0xfec00000, %edx
    movl %ecx, (%rdx)               /* IOREGSEL: low half */
    movl $(DEV_VECTOR | 0x8000), 0x10(%rdx)
    incl %ecx
    movl %ecx, (%rdx)               /* high half: destination APIC 0 */
    movl $0, 0x10(%rdx)
    ret

/* nvme_test: edi = slot. Places BAR 0 (64-bit) at NVME_BAR, enables memory and bus
 * mastering, programs MSI-X vector 0 masked, enables the controller with an admin queue pair
 * and sends IDENTIFY CONTROLLER; the completion must be held by the mask (pending, no
 * interrupt) and delivered on unmask. Then it checks the completion and the identify data. */
nvme_test:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movl %edi, %ebx
    movl $0x10, %esi                /* BAR 0 low, then high: below 4 GiB, in the identity map */
    movl $NVME_BAR, %ecx
    call pci_write32
    movl $0x14, %esi
    xorl %ecx, %ecx
    call pci_write32
    call pci_enable_memory_and_master
    movl $NVME_BAR, %r12d
    movl $0x11, %esi
    call pci_find_cap
    testl %eax, %eax
    jz nvme_fail_msix
    movl %eax, %r13d                /* MSI-X capability */
    leal 4(%r13), %esi              /* table: BAR 0 only */
    call pci_read32
    testl $7, %eax
    jnz nvme_fail_msix
    leaq (%r12,%rax), %r14          /* vector 0's entry */
    leal 8(%r13), %esi              /* pending bits: BAR 0 only */
    call pci_read32
    testl $7, %eax
    jnz nvme_fail_msix
    leaq (%r12,%rax), %r15
    movl $0xfee00000, (%r14)        /* vector 0: APIC 0, NVME_VECTOR, masked for now */
    movl $0, 4(%r14)
    movl $NVME_VECTOR, 8(%r14)
    movl $1, 12(%r14)
    movl %r13d, %esi
    call pci_read32
    orl $0x80000000, %eax           /* message control: MSI-X enable */
    movl %eax, %ecx
    call pci_write32
    movl $0, 0x14(%r12)             /* CC: disabled, then wait for CSTS.RDY to clear */
    leaq 0x1c(%r12), %rdi
    movl $1, %esi
    xorl %edx, %edx
    call wait_bits
    testl %eax, %eax
    jz nvme_fail_ready
    movl $NVME_ASQ, %edi            /* empty queues and identify buffer */
    movl $(3 * 512), %ecx
    xorl %eax, %eax
    rep stosq
    movl $0x00070007, 0x24(%r12)    /* AQA: 8 entries each */
    movl $NVME_ASQ, 0x28(%r12)
    movl $0, 0x2c(%r12)
    movl $NVME_ACQ, 0x30(%r12)
    movl $0, 0x34(%r12)
    movl $0x00460001, 0x14(%r12)    /* CC: 16-byte CQEs, 64-byte SQEs, 4 KiB pages, enable */
    leaq 0x1c(%r12), %rdi
    movl $1, %esi
    movl $1, %edx
    call wait_bits
    testl %eax, %eax
    jz nvme_fail_ready
    movl $NVME_ASQ, %edi            /* IDENTIFY (opcode 6), command id 1, CNS 1: controller */
    movl $0x00010006, (%rdi)
    movq $NVME_IDENTIFY, 24(%rdi)
    movl $1, 40(%rdi)
    movl $0, nvme_irq(%rip)
    movl $1, 0x1000(%r12)           /* SQ 0 tail doorbell */
    movl $(NVME_ACQ + 12), %edi     /* the completion's phase tag */
    movl $0x10000, %esi
    movl $1, %edx
    call wait_bits
    testl %eax, %eax
    jz nvme_fail_cmd
    movl $3, %edi                   /* masked: the message waits, pending, for 300 ms */
    call sleep_ticks
    call nvme_release_held
    testq %rax, %rax
    movq %rax, %rsi
    jnz dev_fail
    movl $1, 0x1004(%r12)           /* CQ 0 head doorbell */
    cmpl $0x00010001, NVME_ACQ+12   /* command id 1, phase 1, status 0 */
    jne nvme_fail_status
    cmpw $0x1b36, NVME_IDENTIFY     /* PCI vendor id */
    jne nvme_fail_identify
    cmpl $NVME_SERIAL_WORD, NVME_IDENTIFY+4
    jne nvme_fail_identify
    movq %r12, nvme_bar(%rip)       /* remembered, with its queues' positions, for rounds */
    movl %ebx, nvme_slot(%rip)
    movq %r14, nvme_vec0(%rip)
    movq %r15, nvme_pba(%rip)
    movl $1, nvme_sq_tail(%rip)
    movl $1, nvme_cq_head(%rip)
    movl $1, nvme_phase(%rip)
    movl $2, nvme_cid(%rip)
    leaq str_irq_msix(%rip), %rsi
    movl $NVME_IDENTIFY, %edi
    call put_dev_ok
    jmp dev_done
nvme_fail_msix:
    leaq str_fail_msix(%rip), %rsi
    jmp dev_fail
nvme_fail_ready:
    leaq str_fail_ready(%rip), %rsi
    jmp dev_fail
nvme_fail_cmd:
    leaq str_fail_cmd(%rip), %rsi
    jmp dev_fail
nvme_fail_status:
    leaq str_fail_status(%rip), %rsi
    jmp dev_fail
nvme_fail_identify:
    leaq str_fail_identify(%rip), %rsi
    jmp dev_fail

/* ---------------------------------------------------------------- device rounds */
/* Requested through the guest-control port after boot: the devices found at boot are driven
 * again as they were left, nothing re-initialised. */

/* devices_round: one DMA round trip with its interrupt through every edu device, and one new
 * command on the NVMe controller's admin queue; prints a LUVMM-ROUND line per device and
 * "LUVMM-ROUND done n=R devices=D". */
devices_round:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r15
    incq rounds(%rip)
    xorl %r13d, %r13d
1:  cmpl edu_count(%rip), %r13d
    jae 2f
    leaq edu_bars(%rip), %rax
    movq (%rax,%r13,8), %r12
    leaq edu_slots(%rip), %rax
    movl (%rax,%r13,4), %ebx
    movl %r13d, %r15d
    call edu_round
    incl %r13d
    jmp 1b
2:  cmpq $0, nvme_bar(%rip)
    je 3f
    call nvme_round
    incl %r13d
3:  leaq str_round_done(%rip), %rsi
    call puts
    movq rounds(%rip), %rax
    call put_dec
    leaq str_devices(%rip), %rsi
    call puts
    movl %r13d, %eax
    call put_dec
    call newline
    popq %r15
    popq %r13
    popq %r12
    popq %rbx
    ret

/* round_head: rsi = "LUVMM-ROUND ok n=" or "LUVMM-ROUND FAIL n="; prints it, the round and
 * " bdf=00:SS.0" for slot ebx */
round_head:
    call puts
    movq rounds(%rip), %rax
    call put_dec
    movb $' ', %al
    call putc
    jmp put_bdf

/* edu_dma_start: r12 = BAR, r15d = buffer index. Fills buffer A (0x1c0000 + index * 32 KiB:
 * MAX_EDU of them end below FILL_BASE) with a pattern of the seed, the index and the round,
 * clears buffer B (A + 16 KiB), copies A to the device and waits for it, then starts the copy
 * back to B with a completion interrupt and returns at once (edu completes a DMA from a timer,
 * about 100 ms later).
 * eax = 1 if the first copy finished. */
edu_dma_start:
    movl %r15d, %edi
    shll $15, %edi
    addl $0x1c0000, %edi
    movq %rdi, dma_src(%rip)
    leaq 0x4000(%rdi), %rax
    movq %rax, dma_dst(%rip)
    movq seed(%rip), %r10
    xorq %r15, %r10
    movq rounds(%rip), %rax
    shlq $32, %rax
    xorq %rax, %r10
    movabsq $0x9e3779b97f4a7c15, %r11
    xorl %ecx, %ecx
1:  movq %rcx, %rax
    imulq %r11, %rax
    xorq %r10, %rax
    movq %rax, (%rdi,%rcx,8)
    movq $0, 0x4000(%rdi,%rcx,8)
    incl %ecx
    cmpl $256, %ecx
    jb 1b
    movq %r12, dev_bar(%rip)
    movl %edi, 0x80(%r12)           /* RAM(A) -> device buffer */
    movl $0x40000, 0x88(%r12)
    movl $2048, 0x90(%r12)
    movl $1, 0x98(%r12)
    call edu_idle
    testl %eax, %eax
    jz 2f
    movl $0, dev_irq(%rip)
    movl $0x40000, 0x80(%r12)       /* device buffer -> RAM(B), interrupt when done */
    movq dma_dst(%rip), %rax
    movl %eax, 0x88(%r12)
    movl $2048, 0x90(%r12)
    movl $7, 0x98(%r12)
    movl $1, %eax
2:  ret

/* edu_dma_same: ZF set if buffer B holds what buffer A holds */
edu_dma_same:
    movq dma_src(%rip), %rsi
    movq dma_dst(%rip), %rdi
    movl $256, %ecx
    repe cmpsq
    ret

/* edu_irq_word: r13d = 1 if the interrupt came -> rsi = " irq=msi", " irq=intx" or " irq=none" */
edu_irq_word:
    leaq str_irq_none(%rip), %rsi
    testl %r13d, %r13d
    jz 1f
    leaq str_irq_msi(%rip), %rsi
    cmpq $0, use_intx(%rip)
    je 1f
    leaq str_irq_intx(%rip), %rsi
1:  ret

/* edu_wait_done: r12 = BAR. Waits for the copy edu_dma_start began and its interrupt, and
 * compares. rax = 0 (r13d = 1 if the interrupt came) or the reason string. */
edu_wait_done:
    call edu_idle
    testl %eax, %eax
    leaq str_fail_dma(%rip), %rax
    jz 1f
    leaq dev_irq(%rip), %rdi
    call wait_count
    movl %eax, %r13d
    call edu_dma_same
    leaq str_fail_data(%rip), %rax
    jne 1f
    xorl %eax, %eax
1:  ret

/* edu_round: ebx = slot, r12 = BAR, r15d = buffer index. A DMA round trip with its interrupt. */
edu_round:
    pushq %r13
    call edu_dma_start
    testl %eax, %eax
    leaq str_fail_dma(%rip), %rax
    jz 8f
    call edu_wait_done
    testq %rax, %rax
    jnz 8f
    leaq str_round_ok(%rip), %rsi
    call round_head
    leaq str_dma_ok(%rip), %rsi
    call puts
    call edu_irq_word
    call puts
    call edu_identity               /* is this still the device the guest named at boot? */
    notl %eax
    leaq str_id_ok(%rip), %rsi
    cmpl 0x04(%r12), %eax
    je 7f
    leaq str_id_lost(%rip), %rsi
    call puts
    movl 0x04(%r12), %eax
    notl %eax
    leaq str_found(%rip), %rsi
    call put_key_hex
    jmp 9f
7:  call puts
9:  call newline
    popq %r13
    ret
8:  movq %rax, %r13
    leaq str_round_fail(%rip), %rsi
    call round_head
    movq %r13, %rsi
    call puts
    call newline
    popq %r13
    ret

/* edu_identity: ebx = slot -> eax = the identity the guest gives the edu device in that slot,
 * from its seed: at boot it writes it to the liveness register (0x04), which keeps its inverse
 * and which nothing resets (edu has no reset, and Linux finds no reset method for it), so a
 * round that reads back another value is talking to another device. */
edu_identity:
    imull $0x61c88647, %ebx, %eax
    addl seed(%rip), %eax
    ret

/* nvme_command: r12 = the NVMe BAR. Sends IDENTIFY CONTROLLER, with the next command id, at
 * the tail of the admin submission queue set up at boot (no controller re-initialisation),
 * waits for its completion, checks it and the identify data the controller wrote again, and
 * consumes it (CQ head doorbell). rax = 0, or the reason string. */
nvme_command:
    pushq %rbx
    movq $0, NVME_IDENTIFY          /* the controller must write it again */
    movl nvme_sq_tail(%rip), %ecx
    movl %ecx, nvme_last_slot(%rip)
    movl %ecx, %edi
    shll $6, %edi
    addl $NVME_ASQ, %edi
    movq %rdi, %rbx
    movl $8, %ecx
    xorl %eax, %eax
    rep stosq                       /* the 64-byte entry, cleared */
    movl nvme_cid(%rip), %eax
    shll $16, %eax
    orl $6, %eax                    /* IDENTIFY, this command id */
    movl %eax, (%rbx)
    movq $NVME_IDENTIFY, 24(%rbx)
    movl $1, 40(%rbx)               /* CNS 1: controller */
    movl nvme_sq_tail(%rip), %ecx
    incl %ecx
    andl $7, %ecx
    movl %ecx, nvme_sq_tail(%rip)
    movl %ecx, 0x1000(%r12)         /* SQ 0 tail doorbell */
    movl nvme_cq_head(%rip), %edi
    shll $4, %edi
    addl $(NVME_ACQ + 12), %edi     /* the completion's status and phase */
    movq %rdi, %rbx
    movl $0x10000, %esi
    movl nvme_phase(%rip), %edx
    call wait_bits
    testl %eax, %eax
    leaq str_fail_cmd(%rip), %rax
    jz 9f
    movl nvme_phase(%rip), %eax
    shll $16, %eax
    orl nvme_cid(%rip), %eax        /* status 0, the phase, this command id */
    cmpl %eax, (%rbx)
    leaq str_fail_status(%rip), %rax
    jne 9f
    incl nvme_cid(%rip)
    movl nvme_cq_head(%rip), %ecx
    incl %ecx
    andl $7, %ecx
    jnz 1f
    xorl $1, nvme_phase(%rip)       /* the queue wrapped: the phase tag flips */
1:  movl %ecx, nvme_cq_head(%rip)
    movl %ecx, 0x1004(%r12)         /* CQ 0 head doorbell */
    cmpw $0x1b36, NVME_IDENTIFY
    leaq str_fail_identify(%rip), %rax
    jne 9f
    xorl %eax, %eax
9:  popq %rbx
    ret

/* nvme_round: one command on the admin queue, its completion by MSI-X vector 0 */
nvme_round:
    pushq %rbx
    pushq %r12
    movq nvme_bar(%rip), %r12
    movl nvme_slot(%rip), %ebx
    movl $0, nvme_irq(%rip)
    call nvme_command
    testq %rax, %rax
    jnz 8f
    leaq nvme_irq(%rip), %rdi
    call wait_count
    testl %eax, %eax
    leaq str_fail_irq(%rip), %rax
    jz 8f
    leaq str_round_ok(%rip), %rsi
    call round_head
    leaq str_nvme_ok(%rip), %rsi
    call puts
    movl nvme_last_slot(%rip), %eax
    call put_dec
    call newline
    jmp 9f
8:  movq %rax, %r12
    leaq str_round_fail(%rip), %rsi
    call round_head
    movq %r12, %rsi
    call puts
    call newline
9:  popq %r12
    popq %rbx
    ret

/* irq_in_flight: leaves interrupts in flight and asks to be paused. The NVMe controller gets a
 * command whose completion message is held by masked vector 0 (pending, no interrupt); the
 * first edu device starts a DMA whose completion interrupt comes about 100 ms later. Prints
 * "LUVMM-INFLIGHT armed ..." before the edu DMA, then writes the guest-control port at once. */
irq_in_flight:
    pushq %rbx
    pushq %r12
    pushq %r14
    pushq %r15
    cmpq $0, nvme_bar(%rip)
    je 1f
    movq nvme_bar(%rip), %r12
    movl nvme_slot(%rip), %ebx
    movq nvme_vec0(%rip), %r14
    movq nvme_pba(%rip), %r15
    movl $1, 12(%r14)               /* vector 0 masked: its message must wait */
    movl $0, nvme_irq(%rip)
    call nvme_command
    testq %rax, %rax
    jnz 8f
    testl $1, (%r15)
    leaq str_fail_pending(%rip), %rax
    jz 8f
    cmpl $0, nvme_irq(%rip)
    leaq str_fail_mask(%rip), %rax
    jne 8f
    movl $1, nvme_held(%rip)
1:  leaq str_inflight_armed(%rip), %rsi
    call puts
    movl nvme_held(%rip), %eax
    call put_dec
    leaq str_inflight_edu(%rip), %rsi
    call puts
    movl edu_count(%rip), %eax
    testl %eax, %eax
    setnz %al
    movzbl %al, %eax
    call put_dec
    call newline
    cmpl $0, edu_count(%rip)
    je 2f
    movq edu_bars(%rip), %r12
    movl edu_slots(%rip), %ebx
    xorl %r15d, %r15d
    call edu_dma_start
    testl %eax, %eax
    leaq str_fail_dma(%rip), %rax
    jz 8f
    movl $1, edu_in_flight(%rip)
2:  movw $CONTROL_PORT, %dx         /* pause me, now */
    movl $1, %eax
    outl %eax, %dx
    jmp 9f
8:  leaq str_inflight_fail(%rip), %rsi
    call put_fail
9:  popq %r15
    popq %r14
    popq %r12
    popq %rbx
    ret

/* irq_landed: what irq_in_flight left: the edu DMA must be done with its interrupt delivered,
 * and the NVMe completion still pending behind the mask, delivered on unmask. Prints
 * "LUVMM-INFLIGHT ok bdf=... edu dma=ok irq=msi" and "LUVMM-INFLIGHT ok bdf=... nvme
 * pending=kept irq=msix", or FAIL lines with a reason. */
irq_landed:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cmpl $0, edu_in_flight(%rip)
    je 1f
    movl $0, edu_in_flight(%rip)
    movq edu_bars(%rip), %r12
    movl edu_slots(%rip), %ebx
    call edu_wait_done
    testq %rax, %rax
    jnz 8f
    leaq str_inflight_ok(%rip), %rsi
    call puts
    call put_bdf
    leaq str_inflight_edu_ok(%rip), %rsi
    call puts
    call edu_irq_word
    call puts
    call newline
1:  cmpl $0, nvme_held(%rip)
    je 9f
    movl $0, nvme_held(%rip)
    movq nvme_bar(%rip), %r12
    movl nvme_slot(%rip), %ebx
    movq nvme_vec0(%rip), %r14
    movq nvme_pba(%rip), %r15
    call nvme_release_held
    testq %rax, %rax
    jnz 8f
    leaq str_inflight_ok(%rip), %rsi
    call puts
    call put_bdf
    leaq str_inflight_nvme_ok(%rip), %rsi
    call puts
    call newline
    jmp 9f
8:  leaq str_inflight_fail(%rip), %rsi
    call put_fail
    jmp 1b
9:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* nvme_release_held: r14 = vector 0's table entry (masked), r15 = the pending-bit array. The
 * completion message held by the mask must not have interrupted and must be pending;
 * unmasking must deliver it, after which (masked again) nothing is pending. Leaves vector 0
 * unmasked. rax = 0, or the reason string. */
nvme_release_held:
    cmpl $0, nvme_irq(%rip)
    leaq str_fail_mask(%rip), %rax
    jne 1f
    testl $1, (%r15)
    leaq str_fail_pending(%rip), %rax
    jz 1f
    movl $0, 12(%r14)               /* unmask: the held message arrives now */
    leaq nvme_irq(%rip), %rdi
    call wait_count
    testl %eax, %eax
    leaq str_fail_irq(%rip), %rax
    jz 1f
    movl $1, 12(%r14)               /* masked again: the delivered message is not pending */
    testl $1, (%r15)
    leaq str_fail_stale(%rip), %rax
    jnz 1f
    movl $0, 12(%r14)
    xorl %eax, %eax
1:  ret

/* put_fail: rsi = the line's start, rax = the reason; prints start, "bdf=00:SS.0" of slot
 * ebx, reason, newline */
put_fail:
    pushq %rax
    call puts
    call put_bdf
    popq %rsi
    call puts
    jmp newline

/* sleep_ticks: edi = timer ticks to sleep in hlt; clobbers r8 */
sleep_ticks:
    movq heartbeat(%rip), %r8
    addq %rdi, %r8
1:  hlt
    cmpq %r8, heartbeat(%rip)
    jb 1b
    ret

/* put_dev_ok: ebx = slot, rsi = " irq=..." string, rdi = the page the device wrote. Prints
 * "LUVMM-DEV ok bdf=00:SS.0 dma=ok irq=... dma_gpa=0x... dma_word=0x..." */
put_dev_ok:
    pushq %rsi
    leaq str_dev_ok(%rip), %rsi
    call puts
    call put_bdf
    leaq str_dma_ok(%rip), %rsi
    call puts
    popq %rsi
    call puts
    leaq str_dma_gpa(%rip), %rsi
    movq %rdi, %rax
    call put_key_hex
    leaq str_dma_word(%rip), %rsi
    movq (%rdi), %rax
    call put_key_hex
    jmp newline

/* put_bdf: prints "bdf=00:SS.0" for slot ebx */
put_bdf:
    leaq str_bdf(%rip), %rsi
    call puts
    movl %ebx, %eax
    shrl $4, %eax
    leaq hex_digits(%rip), %rsi
    movb (%rsi,%rax), %al
    call putc
    movl %ebx, %eax
    andl $0xf, %eax
    movb (%rsi,%rax), %al
    call putc
    leaq str_fn0(%rip), %rsi
    jmp puts

isr_dev:
    pushq %rax
    pushq %rcx
    pushq %rdx
    movq dev_bar(%rip), %rcx
    movl 0x24(%rcx), %eax           /* interrupt status */
    movl %eax, 0x64(%rcx)           /* acknowledge */
    incl dev_irq(%rip)
    jmp eoi_iret

isr_nvme:
    pushq %rax
    pushq %rcx
    pushq %rdx
    incl nvme_irq(%rip)
    jmp eoi_iret

/* ---------------------------------------------------------------- interrupts */
start_timer:
    movl $0x1b, %ecx                /* IA32_APIC_BASE: enable, x2APIC mode */
    rdmsr
    orl $0xc00, %eax
    wrmsr
    xorl %edx, %edx
    movl $0x80f, %ecx               /* spurious vector register: APIC on */
    movl $(0x100 | SPURIOUS_VECTOR), %eax
    wrmsr
    movl $0x83e, %ecx               /* timer divide: by 1 */
    movl $0xb, %eax
    wrmsr
    movl $0x832, %ecx               /* LVT timer: periodic */
    movl $(TIMER_VECTOR | 0x20000), %eax
    wrmsr
    movl $0x838, %ecx               /* initial count */
    movl $TICK_COUNT, %eax
    wrmsr
    ret

setup_idt:
    leaq idt(%rip), %rdi
    xorl %ecx, %ecx
1:  leaq isr_unexpected(%rip), %rsi
    cmpl $32, %ecx
    jae 2f
    movl %ecx, %esi
    shll $4, %esi
    leaq fault_stubs(%rip), %rax
    addq %rax, %rsi
2:  call write_gate
    addq $16, %rdi
    incl %ecx
    cmpl $256, %ecx
    jb 1b
    leaq idt+TIMER_VECTOR*16(%rip), %rdi
    leaq isr_timer(%rip), %rsi
    call write_gate
    leaq idt+DEV_VECTOR*16(%rip), %rdi
    leaq isr_dev(%rip), %rsi
    call write_gate
    leaq idt+NVME_VECTOR*16(%rip), %rdi
    leaq isr_nvme(%rip), %rsi
    call write_gate
    leaq idt+SPURIOUS_VECTOR*16(%rip), %rdi
    leaq isr_spurious(%rip), %rsi
    jmp write_gate

/* rdi = gate, rsi = handler: a present 64-bit interrupt gate in code segment 0x08 */
write_gate:
    movq %rsi, %rax
    movw %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    ret

/* Each vCPU's tick bumps its own heartbeat, found by its x2APIC id. */
isr_timer:
    pushq %rax
    pushq %rcx
    pushq %rdx
    movl $0x802, %ecx               /* x2APIC ID */
    rdmsr
    cmpl $MAX_CPUS, %eax
    jae eoi_iret
    leaq heartbeats(%rip), %rdx
    lock incq (%rdx,%rax,8)
    testl %eax, %eax
    jnz eoi_iret
    call tick_clock                 /* the BSP's tick also times itself by the TSC */
/* eoi_iret: the end of every handler that pushed rax, rcx, rdx: x2APIC EOI, then return */
eoi_iret:
    movl $0x80b, %ecx               /* x2APIC EOI */
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    popq %rdx
    popq %rcx
    popq %rax
    iretq

isr_spurious:
    iretq

/* tick_clock: on each of the BSP's ticks, the TSC step since its previous tick, kept as the
 * largest since the last check (a pause the guest's own clock saw shows as one long gap) and
 * as the most negative (a TSC set back). Clobbers rax and rdx (isr_timer saved them). */
tick_clock:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq tick_tsc(%rip), %rdx
    movq %rax, tick_tsc(%rip)
    testq %rdx, %rdx
    jz 1f
    cmpq $0, tick_tsc_cal(%rip)
    jne 3f
    pushq %rax                      /* calibrating: is this the window's last tick? */
    movq heartbeat(%rip), %rax
    subq tick_first(%rip), %rax
    cmpq $CALIBRATION_TICKS, %rax
    popq %rax
    jb 3f
    movq %rax, tick_tsc_cal(%rip)
3:  subq %rdx, %rax                /* this step, signed: a TSC set back makes it negative */
    cmpq tick_gap_max(%rip), %rax
    jle 4f
    movq %rax, tick_gap_max(%rip)
4:  cmpq tick_back_max(%rip), %rax
    jge 2f
    movq %rax, tick_back_max(%rip)
2:  ret
1:  movq %rax, tick_tsc_first(%rip)
    movq heartbeat(%rip), %rax
    movq %rax, tick_first(%rip)
    ret

isr_unexpected:
    pushq $-1
    pushq $-1
    jmp fault_common

    .balign 16
fault_stubs:
    .set vector, 0
    .rept 32
    .balign 16
    pushq $vector
    jmp fault_common
    .set vector, vector + 1
    .endr

/* stack: vector, [error code], rip, ... */
fault_common:
    cli
    movq (%rsp), %rbx
    leaq 8(%rsp), %r12
    cmpq $32, %rbx
    jae 1f
    movl $ERRCODE_VECTORS, %eax
    btl %ebx, %eax
    jnc 1f
    addq $8, %r12
1:  leaq str_fault(%rip), %rsi
    call puts
    movq %rbx, %rax
    call put_dec
    leaq str_rip(%rip), %rsi
    call puts
    movq (%r12), %rax
    call put_hex
    call newline
halt_forever:
    cli
    hlt
    jmp halt_forever

/* ---------------------------------------------------------------- serial output */
/* putc: al; preserves every register */
putc:
    pushq %rdx
    pushq %rax
    movw $SERIAL_LSR, %dx
1:  inb %dx, %al
    testb $0x20, %al                /* transmit holding register empty */
    jz 1b
    popq %rax
    movw $SERIAL, %dx
    outb %al, %dx
    popq %rdx
    ret

/* puts: rsi = NUL-terminated string; preserves every register */
puts:
    pushq %rax
    pushq %rsi
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    jmp 1b
2:  popq %rsi
    popq %rax
    ret

newline:
    pushq %rax
    movb $'\n', %al
    call putc
    popq %rax
    ret

/* put_dec: rax as unsigned decimal; preserves every register */
put_dec:
    pushq %rax
    pushq %rbx
    pushq %rdx
    pushq %rsi
    leaq numbuf_end(%rip), %rsi
    movb $0, (%rsi)
    movl $10, %ebx
1:  xorl %edx, %edx
    divq %rbx
    addb $'0', %dl
    decq %rsi
    movb %dl, (%rsi)
    testq %rax, %rax
    jnz 1b
    call puts
    popq %rsi
    popq %rdx
    popq %rbx
    popq %rax
    ret

/* put_key_hex: the string at rsi, then rax in hex; preserves every register */
put_key_hex:
    call puts
/* put_hex: rax as 0x + 16 hex digits; preserves every register */
put_hex:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    movq %rax, %rdx
    leaq str_0x(%rip), %rsi
    call puts
    leaq hex_digits(%rip), %rsi
    movl $16, %ecx
1:  rolq $4, %rdx
    movl %edx, %eax
    andl $0xf, %eax
    movb (%rsi,%rax), %al
    call putc
    decl %ecx
    jnz 1b
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    ret

/* ---------------------------------------------------------------- data */
    .section .rodata
str_boot:       .asciz "LUVMM-BOOT proto="
str_linux64:    .asciz "linux64"
str_pvh:        .asciz "pvh"
str_ram:        .asciz " ram_mib="
str_fill:       .asciz " fill_pages="
str_seed:       .asciz " seed="
str_check_ok:   .asciz "LUVMM-CHECK ok pages="
str_heartbeat:  .asciz " heartbeat="
str_checks:     .asciz " checks="
str_vcpus:      .asciz " vcpus="
str_heartbeats: .asciz " heartbeats="
str_tick_gap:   .asciz " tick_gap_tsc="
str_tick_tsc:   .asciz " tick_tsc="
str_tick_back:  .asciz " tick_back_tsc="
str_cover:      .asciz " cover="
str_smp:        .asciz "LUVMM-SMP"
str_check_lost: .asciz "LUVMM-CHECK LOST first_bad_gpa="
str_expected:   .asciz " expected="
str_found:      .asciz " found="
str_id_ok:      .asciz " id=ok"
str_id_lost:    .asciz " id=LOST"
str_fault:      .asciz "LUVMM-FAULT vector="
str_rip:        .asciz " rip="
str_bad_pvh:    .asciz "LUVMM-FAULT bad hvm_start_info magic\n"
str_fill_key:   .asciz "luvmm.fill_pages="
str_dma_outside_key: .asciz "luvmm.dma_outside="
str_intx_key:   .asciz "luvmm.intx="
str_end_key:    .asciz "luvmm.end="
str_scan_done:  .asciz "LUVMM-DEV scan done devices="
str_dma_outside: .asciz "LUVMM-DEV dma_outside sent "
str_0x:         .asciz "0x"
str_dev_ok:     .asciz "LUVMM-DEV ok "
str_dev_fail:   .asciz "LUVMM-DEV FAIL "
str_bdf:        .asciz "bdf=00:"
str_fn0:        .asciz ".0"
str_dma_ok:     .asciz " dma=ok"
str_irq_msi:    .asciz " irq=msi"
str_irq_none:   .asciz " irq=none"
str_irq_intx:   .asciz " irq=intx"
str_irq_msix:   .asciz " irq=msix"
str_mmio:       .asciz "LUVMM-DEV mmio "
str_mmio_reads: .asciz " reads="
str_mmio_cycles: .asciz " cycles_per_read="
str_dma_gpa:    .asciz " dma_gpa="
str_dma_word:   .asciz " dma_word="
str_fail_id:    .asciz " reason=id"
str_fail_live:  .asciz " reason=liveness"
str_fail_dma:   .asciz " reason=dma-timeout"
str_fail_data:  .asciz " reason=dma-data"
str_fail_msix:  .asciz " reason=no-msix-in-bar0"
str_fail_ready: .asciz " reason=controller-not-ready"
str_fail_cmd:   .asciz " reason=command-timeout"
str_fail_mask:  .asciz " reason=masked-vector-interrupted"
str_fail_pending: .asciz " reason=masked-vector-not-pending"
str_fail_irq:   .asciz " reason=no-interrupt-after-unmask"
str_fail_stale: .asciz " reason=delivered-message-still-pending"
str_fail_status: .asciz " reason=completion-status"
str_fail_identify: .asciz " reason=identify-data"
str_round_ok:   .asciz "LUVMM-ROUND ok n="
str_round_fail: .asciz "LUVMM-ROUND FAIL n="
str_round_done: .asciz "LUVMM-ROUND done n="
str_devices:    .asciz " devices="
str_nvme_ok:    .asciz " nvme=ok irq=msix sq_slot="
str_inflight_armed: .asciz "LUVMM-INFLIGHT armed nvme_held="
str_inflight_edu: .asciz " edu_in_flight="
str_inflight_ok: .asciz "LUVMM-INFLIGHT ok "
str_inflight_fail: .asciz "LUVMM-INFLIGHT FAIL "
str_inflight_edu_ok: .asciz " edu dma=ok"
str_inflight_nvme_ok: .asciz " nvme pending=kept irq=msix"
hex_digits:     .ascii "0123456789abcdef"

    .section .note.Xen, "a"
    .balign 4
    .long 4                         /* name size: "Xen\0" */
    .long 4                         /* descriptor size */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_entry

    .section .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word 4095
    .quad idt
    .balign 8
fill_pages:     .quad -1                /* every page, unless the command line says fewer */
dma_outside:    .quad 0
use_intx:       .quad 0
end_request:    .quad 0

    .section .bss
    .balign 4096
pml4:           .skip 4096
pdpt:           .skip 4096
pd:             .skip MAP_GIB * 4096
idt:            .skip 4096
stack:          .skip 16384
stack_top:
ap_stacks:      .skip MAX_CPUS * 4096    /* [id]: vCPU id's stack, 0 unused (the BSP has stack) */
ram_ranges:     .skip MAX_RANGES * 16    /* [start, end) of each covered RAM range */
boot_info:      .skip 8
protocol:       .skip 4
    .balign 8
ram_bytes:      .skip 8
ram_pages:      .skip 8
ram_range_count: .skip 4
vcpus_up:       .skip 4
cmdline_ptr:    .skip 8
seed:           .skip 8
heartbeat:                              /* the BSP's: heartbeats[0] */
heartbeats:     .skip MAX_CPUS * 8
checks:         .skip 8
tick_tsc:       .skip 8                 /* the TSC at the BSP's last tick, 0 before its first */
tick_tsc_first: .skip 8                 /* ... at its first, with the heartbeat then */
tick_first:     .skip 8
tick_tsc_cal:   .skip 8                 /* ... at the tick CALIBRATION_TICKS later, 0 until then */
tick_gap_max:   .skip 8                 /* the largest TSC step between two ticks since the last check */
tick_back_max:  .skip 8                 /* ... the most negative one, 0 if none */
dev_bar:        .skip 8
dma_src:        .skip 8
dma_dst:        .skip 8
dev_irq:        .skip 8
nvme_irq:       .skip 8
requests:       .skip 8
rounds:         .skip 8
edu_bars:       .skip MAX_EDU * 8
edu_slots:      .skip MAX_EDU * 4
edu_count:      .skip 4
edu_in_flight:  .skip 4
nvme_bar:       .skip 8
nvme_vec0:      .skip 8
nvme_pba:       .skip 8
nvme_slot:      .skip 4
nvme_sq_tail:   .skip 4
nvme_cq_head:   .skip 4
nvme_phase:     .skip 4
nvme_cid:       .skip 4
nvme_last_slot: .skip 4
nvme_held:      .skip 4
numbuf:         .skip 31
numbuf_end:     .skip 1
