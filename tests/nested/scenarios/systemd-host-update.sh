#!/bin/sh
# The host-wide update where systemd holds the sessions (an L1 booted with Debian sid's
# systemd as init, from systemd-initramfs.sh): VMs a and b run as luvmm@a and luvmm@b, the
# repository's unit, started by systemd from their configs. No agent runs.
#   stage 1: both guests checked; `luvmm host-check` says systemd holds the sessions; a's
#            update staged, prepared and called off: its session goes into its service's fd
#            store and out again, the guest runs on; `update run --deadline 5` with b's VMM
#            stopped calls everyone off at the deadline; b's stage, driven no further, is
#            called off by b itself at its update limit; then `luvmm update run` stages every VM (each VMM creates its own session and pushes it into
#            its service's fd store), prepares them together, loads the kernel and runs
#            `systemctl kexec`.
#   stage 2: systemd hands each service its session back at start; both VMs are restored by
#            their units with no command typed; each guest's own check after the resume, and
#            one more asked; `update status`. Then b staged and its unit restarted: the session
#            its VMM left behind is dropped and b boots afresh.
stage=$1
cd /tmp
. /luvmm/steps.sh
log_of() { echo "/var/log/luvmm-$1.log"; }
sock_of() { echo "/run/luvmm-$1.sock"; }
check() { # check VM NTH: asks the guest for its memory check, prints it once whole
    luvmm ctl --socket "$(sock_of "$1")" check >/dev/null
    wait_line "$(log_of "$1")" "LUVMM-CHECK" "$2"
    whole_lines "$(log_of "$1")"
    echo "LUVMM-L1 host-update check $(last_whole "$(log_of "$1")" LUVMM-CHECK)"
}
journal() { # journal VM: the unit's log, as lines of this console
    journalctl -q -o cat -u "luvmm@$1.service" -b --no-pager | sed "s/^/LUVMM-L1 log luvmm@$1: /"
}
running() { # running VM: waits until its unit's VM runs
    i=0
    while [ "$(phase "$(sock_of "$1")")" != running ] && [ $i -lt 600 ]; do
        sleep 0.1; i=$((i + 1))
    done
    [ "$(phase "$(sock_of "$1")")" = running ]
}

for vm in a b; do
    running $vm || echo "LUVMM-L1 test host_update_systemd_vm_${vm}_runs FAIL $(systemctl status luvmm@$vm --no-pager 2>&1 | tr '\n' ' ')"
done
hostcheck
case "$stage" in
1)
    for vm in a b; do
        wait_line "$(log_of $vm)" "LUVMM-BOOT"
        check $vm 1
    done
    luvmm update status --json > status.json 2> status.err
    echo "LUVMM-L1 host-update status before exit=$? $(cat status.json) $(cat status.err)"
    stored() { systemctl show -p NFileDescriptorStore --value luvmm@a; }
    luvmm ctl --socket "$(sock_of a)" update stage --vm-id a > stage.out 2>&1
    staged=$(stored)
    luvmm ctl --socket "$(sock_of a)" update prepare --vm-id a > prepare.out 2>&1
    prepared=$(stored)
    luvmm ctl --socket "$(sock_of a)" update cancel > cancel.out 2>&1
    left=$(stored)
    # The session at the stage; its record beside it at the prepare; nothing once called off.
    result host_update_systemd_a_called_off_leaves_nothing_in_its_store \
        $([ "$staged" = 1 ] && [ "$prepared" = 2 ] && [ "$left" = 0 ] \
            && [ "$(phase "$(sock_of a)")" = running ]; echo $?) \
        "stored: staged $staged, prepared $prepared, left $left; $(cat stage.out prepare.out cancel.out | tr '\n' ' ')"
    check a 2
    # update run's own deadline, with b's VMM stopped (SIGSTOP): b does not answer, and at
    # the deadline the update is called off for every VM, each left as it was.
    pid_b=$(systemctl show -p MainPID --value luvmm@b)
    kill -STOP "$pid_b"
    luvmm update run --kernel /boot/bzImage --initrd /boot/initrd-stage2.img \
        --append luvmm.stage=2 --known-good-kernel --deadline 5 --json > deadline.json 2> deadline.err
    code=$?
    kill -CONT "$pid_b"
    stored_b() { systemctl show -p NFileDescriptorStore --value luvmm@b; }
    result host_update_systemd_run_deadline_calls_everyone_off \
        $([ $code = 4 ] && grep -q '"outcome":"called_off"' deadline.json \
            && grep -q 'the deadline passed' deadline.json \
            && [ "$(phase "$(sock_of a)")" = running ] && [ "$(stored)" = 0 ] \
            && [ "$(phase "$(sock_of b)")" = running ] && [ "$(stored_b)" = 0 ]; echo $?) \
        "exit $code: $(cat deadline.json) $(cat deadline.err); stored a $(stored) b $(stored_b)"
    # A stage nobody drives on: b calls it off by itself at its update limit (8 s in its
    # unit's drop-in), its store emptied, its guest running on.
    luvmm ctl --socket "$(sock_of b)" update stage --vm-id b > stage-b.out 2>&1
    staged_b=$(stored_b)
    i=0
    while ! journalctl -q -o cat -u luvmm@b.service -b | grep -q "update called off" && [ $i -lt 300 ]; do
        sleep 0.1; i=$((i + 1))
    done
    result host_update_systemd_b_calls_an_undriven_stage_off_at_its_limit \
        $([ "$staged_b" = 1 ] \
            && journalctl -q -o cat -u luvmm@b.service -b | grep -q "did not kexec within its limit" \
            && [ "$(phase "$(sock_of b)")" = running ] && [ "$(stored_b)" = 0 ]; echo $?) \
        "staged: $staged_b stored; b: $(phase "$(sock_of b)"), stored $(stored_b); $(cat stage-b.out)"
    check a 3
    check b 2
    # The progress goes to the console as it comes: the kexec ends this stage.
    mkfifo progress
    sed 's/^/LUVMM-L1 log update run: /' < progress &
    echo "LUVMM-L1 host-update kexec now"
    luvmm update run --kernel /boot/bzImage --initrd /boot/initrd-stage2.img \
        --append luvmm.stage=2 --known-good-kernel --json > run.json 2> progress
    code=$?
    sleep 60
    echo "LUVMM-L1 test host_update_systemd_kexec FAIL still here: exit $code $(cat run.json)"
    journal a
    journal b
    ;;
2)
    for vm in a b; do
        journal $vm
        result "host_update_systemd_${vm}_restored_from_its_fd_store" \
            $(journalctl -q -o cat -u "luvmm@$vm.service" -b | grep -q "its session waits after a host update; restoring it" \
                && [ "$(phase "$(sock_of $vm)")" = running ]; echo $?) \
            "$(systemctl status luvmm@$vm --no-pager 2>&1 | tr '\n' ' ')"
        # Each restore asks its guest for a check at the resume: the first line after the kexec.
        wait_line "$(log_of $vm)" "LUVMM-CHECK"
        whole_lines "$(log_of $vm)"
        echo "LUVMM-L1 host-update check $(last_whole "$(log_of $vm)" LUVMM-CHECK)"
        check $vm 2
    done
    echo "LUVMM-L1 systemd kexecs $(systemctl show -p KExecCount --value)"
    luvmm update status --json > status.json 2> status.err
    echo "LUVMM-L1 host-update status exit=$? $(cat status.json) $(cat status.err)"
    luvmm update status | sed 's/^/LUVMM-L1 log update status: /'
    # The sessions are finished and gone from the stores: nothing holds /dev/liveupdate.
    result host_update_systemd_stores_emptied \
        $(for vm in a b; do systemctl show -p NFileDescriptorStore --value luvmm@$vm; done | grep -qv '^0$'; [ $? = 1 ]; echo $?) \
        "$(for vm in a b; do echo "$vm: $(systemctl show -p NFileDescriptorStore luvmm@$vm)"; done)"
    # A VMM that exits while staged (here `systemctl restart`) leaves its session in its
    # store; the next start drops it (LUO retrieves nothing before a kexec) and boots afresh.
    luvmm ctl --socket "$(sock_of b)" update stage --vm-id b > restage.out 2>&1
    staged_b=$(systemctl show -p NFileDescriptorStore --value luvmm@b)
    systemctl restart luvmm@b
    running b
    result host_update_systemd_b_restarted_while_staged_boots_afresh \
        $([ "$staged_b" = 1 ] && [ "$(phase "$(sock_of b)")" = running ] \
            && journalctl -q -o cat -u luvmm@b.service -b | grep -q "left in the fd store by a VMM that exited" \
            && [ "$(systemctl show -p NFileDescriptorStore --value luvmm@b)" = 0 ]; echo $?) \
        "staged: $staged_b stored; b: $(phase "$(sock_of b)"), stored $(systemctl show -p NFileDescriptorStore --value luvmm@b); $(cat restage.out)"
    ;;
esac
