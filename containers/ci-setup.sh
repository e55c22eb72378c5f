#!/usr/bin/env bash
# What tests/integration/test_container.py needs on a fresh Debian machine (called by .ci/run):
# podman with runc (crun fails on these machines: cgroups in hybrid mode, setrlimit refused) and
# debootstrap (containers/local-base.sh), and a containers.conf that lets runc start containers there.
# Idempotent: installs nothing when the commands are there and the configuration already says so.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for cmd in podman runc debootstrap; do
    command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
        || missing+=("$cmd")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ci-setup: installing podman runc debootstrap (missing: ${missing[*]})"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q podman runc debootstrap >/dev/null
fi

# No ulimits passed to the runtime (setting them is refused here) and cgroupfs instead of systemd.
conf=/etc/containers/containers.conf
wanted='[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"'
if [ ! -e "$conf" ]; then
    $SUDO mkdir -p /etc/containers
    printf '%s\n' "$wanted" | $SUDO tee "$conf" >/dev/null
    echo "ci-setup: wrote $conf"
elif ! grep -q '^default_ulimits = \[\]' "$conf" || ! grep -q '^cgroup_manager = "cgroupfs"' "$conf"; then
    # someone else's configuration: say what it needs rather than overwrite it
    echo "ci-setup: $conf exists but lacks these settings; add them:" >&2
    printf '%s\n' "$wanted" >&2
    exit 1
fi
