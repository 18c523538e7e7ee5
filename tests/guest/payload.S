/*
 * luvmm test payload: a tiny x86-64 guest that proves nothing was lost across a save/restore.
 *
 * Entry points:
 *   linux64_entry  64-bit Linux boot protocol (ELF e_entry): long mode, RSI = boot_params.
 *   pvh_entry      PVH (XEN_ELFNOTE_PHYS32_ENTRY note): 32-bit protected mode, paging off,
 *                  EBX = hvm_start_info. It builds its own identity map of the first 1 GiB.
 *
 * After boot it reads the RAM size from the e820 map or the PVH memory map, reads
 * "luvmm.fill_pages=N" from the command line, writes one seeded 64-bit word into each of N
 * 4 KiB pages from 2 MiB up, and prints
 *     LUVMM-BOOT proto=<linux64|pvh> ram_mib=R fill_pages=N seed=0x...
 * It then sleeps in HLT between x2APIC timer ticks (10 Hz) that bump a heartbeat counter.
 * After each wake-up it reads the luvmm guest-control port; bit 0 set means "check now", and
 * it re-reads every filled page and prints one of
 *     LUVMM-CHECK ok pages=N heartbeat=H seed=0x... checks=C
 *     LUVMM-CHECK LOST first_bad_gpa=0x... expected=0x... found=0x...
 * Any CPU exception prints LUVMM-FAULT vector=V rip=0x... and halts for good.
 */

    .set SERIAL,              0x3f8
    .set SERIAL_LSR,          0x3fd
    .set CONTROL_PORT,        0x600
    .set FILL_BASE,           0x200000
    .set IDENTITY_LIMIT,      0x40000000
    .set DEFAULT_FILL_PAGES,  1024
    .set TIMER_VECTOR,        32
    .set SPURIOUS_VECTOR,     0xff
    .set TICK_COUNT,          100000000     /* 100 ms: KVM's APIC timer counts at 1 GHz */
    .set PVH_MAGIC,           0x336ec578
    .set ERRCODE_VECTORS,     0x60227d00    /* 8, 10-14, 17, 21, 29, 30 push an error code */

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
    movl $pdpt, %eax
    orl $3, %eax
    movl %eax, pml4
    movl $pd, %eax
    orl $3, %eax
    movl %eax, pdpt
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present, writable, 2 MiB page */
    movl %eax, pd(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 1b
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

/* ---------------------------------------------------------------- common 64-bit path */
    .code64
common64:
    lgdt gdt_ptr(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq stack_top(%rip), %rsp
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  call setup_idt
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
    call fill_pattern
    call print_boot_line
    call start_timer
    sti
main_loop:
    hlt
    movw $CONTROL_PORT, %dx
    inl %dx, %eax
    testl $1, %eax
    jz main_loop
    call run_check
    jmp main_loop

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
    testl %ecx, %ecx
    jz 6f
4:  cmpl $1, 16(%rsi)               /* usable RAM */
    jne 5f
    movq 8(%rsi), %rax
    addq %rax, %r9
    movq (%rsi), %rdx
    cmpq $FILL_BASE, %rdx
    ja 5f
    addq %rdx, %rax
    cmpq $FILL_BASE, %rax
    jbe 5f
    movq %rax, low_end(%rip)        /* end of the usable range that holds FILL_BASE */
5:  addq %r8, %rsi
    decl %ecx
    jnz 4b
6:  movq %r9, ram_bytes(%rip)
    ret

parse_cmdline:
    movq cmdline_ptr(%rip), %rsi
    testq %rsi, %rsi
    jz 9f
1:  cmpb $0, (%rsi)
    je 9f
    leaq str_fill_key(%rip), %rdi
    movq %rsi, %rbx
2:  movb (%rdi), %al
    testb %al, %al
    jz 3f
    cmpb (%rbx), %al
    jne 4f
    incq %rdi
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
6:  movq %rax, fill_pages(%rip)
9:  ret

/* fill_pages = min(fill_pages, pages between FILL_BASE and min(low_end, 1 GiB)) */
clamp_fill_pages:
    movq low_end(%rip), %rax
    movq $IDENTITY_LIMIT, %rdx
    cmpq %rdx, %rax
    cmovaq %rdx, %rax
    subq $FILL_BASE, %rax
    jae 1f
    xorl %eax, %eax
1:  shrq $12, %rax
    cmpq fill_pages(%rip), %rax
    jae 2f
    movq %rax, fill_pages(%rip)
2:  ret

/* ---------------------------------------------------------------- the pattern */
/* word at page address A = seed ^ (A * golden) */
fill_pattern:
    movq fill_pages(%rip), %rcx
    movq seed(%rip), %r10
    movabsq $0x9e3779b97f4a7c15, %r11
    movq $FILL_BASE, %rdi
    testq %rcx, %rcx
    jz 2f
1:  movq %rdi, %rax
    imulq %r11, %rax
    xorq %r10, %rax
    movq %rax, (%rdi)
    addq $4096, %rdi
    decq %rcx
    jnz 1b
2:  ret

run_check:
    incq checks(%rip)
    movq fill_pages(%rip), %rcx
    movq seed(%rip), %r10
    movabsq $0x9e3779b97f4a7c15, %r11
    movq $FILL_BASE, %rdi
    testq %rcx, %rcx
    jz 3f
1:  movq %rdi, %rax
    imulq %r11, %rax
    xorq %r10, %rax
    cmpq %rax, (%rdi)
    jne 2f
    addq $4096, %rdi
    decq %rcx
    jnz 1b
3:  leaq str_check_ok(%rip), %rsi
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
    jmp newline
2:  movq %rax, %rbx
    leaq str_check_lost(%rip), %rsi
    call puts
    movq %rdi, %rax
    call put_hex
    leaq str_expected(%rip), %rsi
    call puts
    movq %rbx, %rax
    call put_hex
    leaq str_found(%rip), %rsi
    call puts
    movq (%rdi), %rax
    call put_hex
    jmp newline

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
    jmp newline

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

isr_timer:
    pushq %rax
    pushq %rcx
    pushq %rdx
    incq heartbeat(%rip)
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
str_check_lost: .asciz "LUVMM-CHECK LOST first_bad_gpa="
str_expected:   .asciz " expected="
str_found:      .asciz " found="
str_fault:      .asciz "LUVMM-FAULT vector="
str_rip:        .asciz " rip="
str_bad_pvh:    .asciz "LUVMM-FAULT bad hvm_start_info magic\n"
str_fill_key:   .asciz "luvmm.fill_pages="
str_0x:         .asciz "0x"
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
fill_pages:     .quad DEFAULT_FILL_PAGES

    .section .bss
    .balign 4096
pml4:           .skip 4096
pdpt:           .skip 4096
pd:             .skip 4096
idt:            .skip 4096
stack:          .skip 16384
stack_top:
boot_info:      .skip 8
protocol:       .skip 4
    .balign 8
ram_bytes:      .skip 8
low_end:        .skip 8
cmdline_ptr:    .skip 8
seed:           .skip 8
heartbeat:      .skip 8
checks:         .skip 8
numbuf:         .skip 31
numbuf_end:     .skip 1
