#!/bin/sh
# A Linux microVM under luvmm on L1's nested KVM, judged by the guest's own kernel: it boots
# from vmlinux (PVH) with 2 vCPUs, the host's CPU model and the NVMe controller passed
# through, reports its CPUs, IO-APIC, XSAVE and NVMe, does O_DIRECT I/O through its nvme
# driver and powers off (luvmm exits 0); then from bzImage, 1 vCPU, the baseline CPU model,
# with a command typed into its console that reboots it (luvmm exits 3).
. /luvmm/steps.sh
cd /tmp
bin=/luvmm/bin
nvme=$(nvme_bdf)
wait_exit() { # wait_exit PID NAME: the VMM's exit status, or 124 after 120 s
    i=0
    while kill -0 "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 300 ]; then
            for t in /proc/$1/task/*; do
                echo "LUVMM-L1 stuck $2 $(cat $t/comm) $(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan 2>/dev/null) $(tr '\n' '|' < $t/stack 2>/dev/null)"
            done
            kill -9 "$1"; echo "LUVMM-L1 test $2 FAIL luvmm still runs after 30 s"; return 124
        fi
        sleep 0.1
    done
    wait "$1"
}
start=$(cut -d" " -f1 /proc/uptime)
luvmm run --kernel $bin/guest-vmlinux --initrd $bin/guest-initrd.cpio.gz --memory-mib 256 --vcpus 2 \
    --vfio "$nvme" --cmdline "console=ttyS0 luvmm.then=io-poweroff" --serial ./pvh.log 2>pvh.err &
pid=$!
wait_exit $pid linux_guest_poweroff
status=$?
echo "LUVMM-L1 linux pvh exit=$status started=$start ended=$(cut -d" " -f1 /proc/uptime)"
result linux_guest_poweroff $([ $status = 0 ] && echo 0 || echo 1) "luvmm exited $status"
sed 's/^/LUVMM-L1 serial pvh /' pvh.log
sed 's/^/LUVMM-L1 log pvh /' pvh.err

# The console is interactive: what arrives on luvmm's standard input is typed into the guest's
# shell, which works out 6*7 and reboots.
(
    i=0
    while ! grep -q 'LUVMM-LINUX boot' bz.log 2>/dev/null && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
    echo 'echo LUVMM-TYPED $((6*7)); reboot -f'
    sleep 1
) | luvmm run --kernel $bin/guest-bzImage --initrd $bin/guest-initrd.cpio.gz --memory-mib 128 --vcpus 1 --cpu-template baseline \
    --serial stdout > bz.log 2>bz.err &
pid=$!
wait_exit $pid linux_guest_reboot
status=$?
echo "LUVMM-L1 linux bzimage exit=$status"
result linux_guest_reboot $([ $status = 3 ] && echo 0 || echo 1) "luvmm exited $status"
grep -q '^LUVMM-TYPED 42' bz.log
result linux_guest_console_input $? "the guest's shell never answered what was typed"
sed 's/^/LUVMM-L1 serial bz /' bz.log
sed 's/^/LUVMM-L1 log bz /' bz.err
