#!/usr/bin/env bash
# A local stand-in for Ray's image (rayproject/ray:<ray>-py311-cpu) where no image registry is
# reachable: Debian bookworm (Python 3.11, as in Ray's image) from Debian's own packages, the user
# `ray` (uid 1000, group users = 100) and a virtual environment owned by that user first on PATH,
# so `python`/`pip` in the Dockerfiles' steps behave as in Ray's conda env. Ray itself comes from the
# Dockerfile's pins (ray[default] is one of them), as it does on top of Ray's image.
#
#   containers/local-base.sh [IMAGE]      # default localhost/domain-adapters-base:bookworm-py311
#   podman build -f containers/Dockerfile.cpu --build-arg BASE_IMAGE=IMAGE ...
#
# Needs root, podman and debootstrap (containers/ci-setup.sh). Does nothing when IMAGE exists.
set -euo pipefail
IMAGE="${1:-localhost/domain-adapters-base:bookworm-py311}"
if podman image exists "$IMAGE"; then
    echo "local-base: $IMAGE exists"
    exit 0
fi
rootfs="$(mktemp -d /var/tmp/domain-adapters-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
chmod 755 "$rootfs"     # mktemp's 700 would become the image's / (and keep the user out of it)
t0=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" >"$rootfs.log" 2>&1 \
    || { tail -n 40 "$rootfs.log"; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
chroot "$rootfs" useradd --uid 1000 --gid 100 --create-home --shell /bin/bash ray
chroot "$rootfs" runuser -u ray -- python3 -m venv /home/ray/venv
chroot "$rootfs" /home/ray/venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"
# apt's downloads and lists: not needed at run time (the image installs nothing with apt)
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/home/ray/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'USER 1000:100' \
    --change 'WORKDIR /home/ray' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null
echo "local-base: $IMAGE made in $((SECONDS - t0)) s"
