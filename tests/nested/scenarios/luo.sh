#!/bin/sh
# The LUO scenario: the kernel's own LUO selftests first, then luvmm's, across a real kexec.
stage=$1
# selftest and hostcheck, shared with the vfio-lu scenario.
. /luvmm/steps.sh
case "$stage" in
1)
    hostcheck
    selftest liveupdate
    selftest luo_kexec_simple --stage 1
    selftest luo_multi_session --stage 1
    luo-scenario stage1 --kernel /boot/bzImage --initrd /boot/initrd-stage2.cpio.gz
    ;;
2)
    hostcheck
    selftest luo_kexec_simple --stage 2
    selftest luo_multi_session --stage 2
    luo-scenario stage2
    hostcheck
    ;;
esac
