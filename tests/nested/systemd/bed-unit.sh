#!/bin/sh
# The systemd L1's scenario runner (luvmm-bed.service): what /init does on the busybox L1.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
stage=1
scenario=none
for word in $(cat /proc/cmdline); do
    case "$word" in
        luvmm.stage=*) stage=${word#*=} ;;
        luvmm.scenario=*) scenario=${word#*=} ;;
    esac
done
echo "LUVMM-L1 boot stage=$stage scenario=$scenario kernel=$(uname -r) init=$(cat /proc/1/comm) systemd=$(systemctl --version | head -1)"
if [ -x "/luvmm/scenarios/$scenario.sh" ]; then
    "/luvmm/scenarios/$scenario.sh" "$stage"
else
    echo "LUVMM-L1 test scenario FAIL no scenario '$scenario'"
fi
echo "LUVMM-L1 end stage=$stage"
systemctl poweroff --force --force
