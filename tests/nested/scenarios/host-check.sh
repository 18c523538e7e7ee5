#!/bin/sh
# luvmm host-check in L1, nothing else: what L1's KVM and TSC look like to an operator.
. /luvmm/steps.sh
stage=${1:-1}
hostcheck
