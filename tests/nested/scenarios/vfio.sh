#!/bin/sh
# luvmm microVMs inside L1 drive the devices passed through with VFIO cdev + iommufd: edu
# devices (DMA, MSI or INTx) and, when the bed has one, an NVMe controller (MSI-X).
# Bad input is refused with a clear error first; then one VM gets every device on bus 0, its
# guest reports DMA and interrupts on LUVMM-DEV lines, the bytes each device wrote are read
# back from the VM's RAM memfd through /proc, and a DMA outside guest RAM must fault in the
# IOMMU. A vfio-pci device behind a bridge shares its IOMMU group with a device a host driver
# holds (the bed puts it there): passing it through must be refused.
cd /tmp
payload=/luvmm/bin/payload.elf
bdfs=""
shared=""
for dev in /sys/bus/pci/drivers/vfio-pci/0000:*; do
    [ -e "$dev" ] || continue
    case "${dev##*/}" in
        0000:00:*) bdfs="$bdfs ${dev##*/}" ;;
        *) shared="$shared ${dev##*/}" ;;
    esac
done
first=$(echo $bdfs | cut -d' ' -f1)

# wait_scan and stop_vm, shared with the watched steps' own shells.
. /luvmm/steps.sh

refused() { # refused NAME EXPECTED ARGS...: luvmm run must fail, saying EXPECTED
    name=$1; expected=$2; shift 2
    if luvmm run --payload $payload --memory-mib 16 --serial none --api-socket bad.sock "$@" \
        > bad.out 2>&1; then
        echo "LUVMM-L1 test bad_$name FAIL accepted"
    elif ! grep -q "$expected" bad.out; then
        echo "LUVMM-L1 test bad_$name FAIL $(tr '\n' ' ' < bad.out)"
    elif [ -e bad.sock ]; then
        echo "LUVMM-L1 test bad_$name FAIL left its API socket behind"
    else
        echo "LUVMM-L1 test bad_$name ok"
    fi
}
watched() { # watched NAME ARGS...: a 16 MiB VM with ARGS, up until its PCI scan ends, while
    # vfio-open-watch records every VFIO and iommufd open; prints its lines as "watch NAME"
    name=$1; shift
    vfio-open-watch -- sh -c '
        . /luvmm/steps.sh
        luvmm run --payload "$0" --memory-mib 16 --serial ./watch.log --api-socket w.sock "$@" \
            2>watch.err &
        vmm=$!
        wait_scan watch.log $vmm watch_scan
        stop_vm w.sock $vmm; true' "$payload" "$@" \
        > "watch-$name.out" 2> "watch-$name.err"
    sed "s/^/LUVMM-L1 watch $name /" "watch-$name.out"
    sed "s/^/LUVMM-L1 log watch $name: /" "watch-$name.err" watch.err
    rm -f watch.log watch.err
}
# The watcher's control: an open of /dev/iommu by a shell; then a VM on VFIO cdev + iommufd.
vfio-open-watch -- sh -c 'true < /dev/iommu' > watch-control.out 2> watch-control.err
sed "s/^/LUVMM-L1 watch control /" watch-control.out
sed "s/^/LUVMM-L1 log watch control: /" watch-control.err
watched iommufd --vfio "$first"

refused missing_bdf "0000:00:1e.0: no such PCI device" --vfio 0000:00:1e.0
refused not_vfio_pci "0000:00:00.0: bound to no driver, not vfio-pci" --vfio 0000:00:00.0
for b in $shared; do
    echo "LUVMM-L1 log group of $b: $(ls /sys/bus/pci/devices/$b/iommu_group/devices | tr '\n' ' ')"
    refused group_not_viable "$b: its IOMMU group is not viable: .* (virtio-pci) bound to a host driver" \
        --vfio "$b"
done
mv /dev/iommu /dev/iommu.hidden
refused no_iommufd "/dev/iommu is missing" --vfio "$first" --vfio-backend iommufd
echo "LUVMM-L1 hostcheck-legacy $(luvmm host-check --json 2>/dev/null)"
watched legacy --vfio "$first"
# Without iommufd, auto falls back to the legacy group/container path, visibly.
luvmm run --payload $payload --memory-mib 64 --vfio "$first" --serial ./legacy.log \
    --api-socket c.sock 2>legacy.err &
vmm=$!
wait_scan legacy.log $vmm legacy_scan
sed 's/^/LUVMM-L1 legacy /' legacy.log
if grep -q "LUVMM-DEV ok.*dma=ok irq=msi" legacy.log && grep -q "legacy VFIO group/container" legacy.err; then
    echo "LUVMM-L1 test legacy_fallback ok"
else
    echo "LUVMM-L1 test legacy_fallback FAIL $(tr '\n' ' ' < legacy.err)"
fi
stop_vm c.sock $vmm
mv /dev/iommu.hidden /dev/iommu

args=""
for b in $bdfs; do args="$args --vfio $b"; done
luvmm run --payload $payload --memory-mib 64 $args --serial ./serial.log --api-socket a.sock \
    --cmdline "console=ttyS0 luvmm.fill_pages=256 luvmm.dma_outside=1" 2>run.err &
vmm=$!
wait_scan serial.log $vmm vfio_scan
sed 's/^/LUVMM-L1 serial /' serial.log

# The bytes the guest says the device wrote, read from the RAM memfd outside the guest.
ram=""
for fd in /proc/$vmm/fd/*; do
    case "$(readlink "$fd")" in *luvmm-ram0*) ram=$fd ;; esac
done
grep '^LUVMM-DEV ok' serial.log | while read -r _ _ bdf _ _ gpa word; do
    gpa=${gpa#dma_gpa=}
    word=${word#dma_word=0x}
    got=$(od -A n -t x8 -j $((gpa)) -N 8 "$ram" | tr -d ' ')
    if [ "$got" = "$word" ]; then
        echo "LUVMM-L1 test memfd_holds_dma_${bdf#bdf=} ok"
    else
        echo "LUVMM-L1 test memfd_holds_dma_${bdf#bdf=} FAIL memfd has $got, guest saw $word"
    fi
done
if dmesg | grep -q "DMAR: \[DMA Write.*fault addr 0xf000000"; then
    echo "LUVMM-L1 test iommu_blocked_outside_dma ok"
else
    echo "LUVMM-L1 test iommu_blocked_outside_dma FAIL no DMAR fault for 0xf000000"
    dmesg | grep DMAR | tail -5 | sed 's/^/LUVMM-L1 log /'
fi
refused busy "in use by another process" --vfio "$first"
# The saved state carries each device (BDF, backend, IOAS mappings, config space, MSI) and the
# VM's one IOAS with its HWPTs.
if luvmm ctl --socket a.sock save --export state.bin > save.out 2>&1 \
    && grep -q "\"bdf\":\"$first\",\"guest_slot\":1,\"backend\":\"iommufd_cdev\",\"mappings\":\[{\"iova\":0,\"memfd_index\":0,\"offset\":0,\"len\":67108864}\]" state.bin \
    && grep -q '"msi":{"offset":[0-9]*,"enabled":true' state.bin \
    && grep -q '"iommu":{"ioas_id":[0-9]*,"hwpts":\[[0-9]' state.bin; then
    echo "LUVMM-L1 test save_captures_vfio_state ok"
else
    echo "LUVMM-L1 test save_captures_vfio_state FAIL $(cat save.out)"
fi
if grep -q '"msix":{' state.bin; then
    # The NVMe's MSI-X: enabled, its table as the guest left it (vector 0 unmasked, to
    # APIC 0 with vector 0x42), one GSI per vector.
    if grep -q '"msix":{"offset":[0-9]*,"enabled":true,"table":\[4276092928,0,66,0,' state.bin; then
        echo "LUVMM-L1 test save_captures_msix ok"
    else
        echo "LUVMM-L1 test save_captures_msix FAIL $(grep -o '"msix":{[^}]*}' state.bin)"
    fi
fi
stop_vm a.sock $vmm
sed 's/^/LUVMM-L1 log /' run.err

# The same devices again, the guest using INTx (IOAPIC line, resample eventfd) instead of MSI,
# and every BAR access trapped rather than mapped.
luvmm run --payload $payload --memory-mib 64 $args --vfio-trap-bars --serial ./intx.log --api-socket b.sock \
    --cmdline "console=ttyS0 luvmm.fill_pages=64 luvmm.intx=1" 2>intx.err &
vmm=$!
wait_scan intx.log $vmm intx_scan
sed 's/^/LUVMM-L1 serial /' intx.log
stop_vm b.sock $vmm
sed 's/^/LUVMM-L1 log /' intx.err

# Figures: device setup and IOAS map time against guest memory size.
for mib in 16 128 512; do
    # Removed first: the shell truncates size.err in the background child, so the wait below
    # could otherwise still read the previous VM's line.
    rm -f size.err
    luvmm run --payload $payload --memory-mib $mib --vfio "$first" --serial none \
        --api-socket size.sock 2>size.err &
    vmm=$!
    i=0
    while ! grep -q "mapped by file in" size.err 2>/dev/null && [ $i -lt 600 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    echo "LUVMM-L1 figure setup_${mib}mib $(grep -o 'opened.*' size.err); $(grep -o 'IOAS:.* in [0-9.]* ms' size.err)"
    stop_vm size.sock $vmm
done
