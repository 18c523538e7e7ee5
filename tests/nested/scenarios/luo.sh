#!/bin/sh
# The LUO scenario: the kernel's own LUO selftests first, then luvmm's, across a real kexec.
stage=$1
selftest() { # selftest NAME ARGS...: runs a kernel selftest and reports it in one line
    name=$1; shift
    "/selftests/$name" "$@" > "/tmp/$name.log" 2>&1
    code=$?
    # A skipped test passes nothing: kselftest exits 4 for a skip, and a harness test that
    # skips one case still exits 0, so its TAP output is read too.
    skips=$(grep -cE '# SKIP|skip:[1-9]' "/tmp/$name.log")
    if [ "$code" = 0 ] && [ "$skips" = 0 ]; then
        echo "LUVMM-L1 selftest $name $* ok"
    else
        echo "LUVMM-L1 selftest $name $* FAIL (exit $code, $skips skip lines)"
        sed 's/^/LUVMM-L1 log /' "/tmp/$name.log" | tail -20
    fi
}
hostcheck() {
    luvmm host-check --json >/tmp/hostcheck.json 2>/tmp/hostcheck.err
    code=$?
    echo "LUVMM-L1 hostcheck stage=$stage exit=$code $(tr -d '\n' </tmp/hostcheck.json)"
    sed 's/^/LUVMM-L1 log /' /tmp/hostcheck.err
}
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
