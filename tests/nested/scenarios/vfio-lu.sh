#!/bin/sh
# The kernel half's tests: luvmm's VFIO live-update handler (tests/nested/patches/) across a
# chain of real kexecs, stage 1 in reset mode, 2 in keep, 3 in reset, 4 with a handler that
# fails to register (its `register` fault).
# The kernel's own LUO selftest runs first, with the handler registered.
stage=$1
. /luvmm/steps.sh
echo "LUVMM-L1 handler mode=$(cat /sys/module/vfio_pci/parameters/luvmm_lu 2>/dev/null || echo absent)"
for dev in /sys/bus/pci/drivers/vfio-pci/0000:*; do
    echo "LUVMM-L1 reset_method ${dev##*/} $(cat "$dev/reset_method" 2>/dev/null || echo none)"
done
case "$stage" in
1)
    hostcheck
    selftest liveupdate
    vfio-lu stage1 --kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz
    ;;
2 | 3)
    vfio-lu "stage$stage" --kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz
    ;;
4)
    vfio-lu stage4
    hostcheck
    ;;
*)
    echo "LUVMM-L1 test vfio_lu_chain FAIL booted into unexpected stage $stage"
    ;;
esac
dmesg | grep -E "luvmm-lu|vfio|nvme" | sed 's/^/LUVMM-L1 log /'
