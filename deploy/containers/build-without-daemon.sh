#!/bin/sh
# Build Dockerfile.agent and Dockerfile.trainer where there is no Docker daemon and no container registry:
# buildah (chroot isolation, no daemon) on a stand-in for python:3.11-slim-bookworm that debootstrap makes
# from Debian's archive (bookworm's own Python 3.11, /usr/bin instead of /usr/local/bin). This is how the
# images were built where the real ones could not be (deploy/containers/README.md, "Built here").
# The broker image is not built: its base is eclipse-mosquitto (Alpine), which only a registry has.
#
#   apt-get install -y buildah debootstrap
#   sh deploy/containers/build-without-daemon.sh [agent] [trainer]
#     TORCH_WHEEL_DIR=DIR   serve torch from DIR (a torch-2.13.0+cpu wheel) instead of download.pytorch.org
#     WORK=DIR              where the stand-in base, the index and buildah's storage live (default /tmp/ef-oci)
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${WORK:-/tmp/ef-oci}
base=docker.io/library/python:3.11-slim-bookworm
buildah="buildah --root $work/storage --runroot $work/run --storage-driver ${STORAGE_DRIVER:-overlay}"
targets=${*:-agent trainer}
mkdir -p "$work"

if ! $buildah inspect --type image "$base" >/dev/null 2>&1; then
    echo "== stand-in for $base: debootstrap bookworm (minbase, python3, python3-pip, python3-venv)"
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$work/rootfs" >"$work/debootstrap.log"
    # A host whose traffic passes a TLS-inspecting proxy trusts its CA (in /usr/local/share/ca-certificates):
    # the stand-in must too, or pip cannot reach the index. Only the stand-in; the Dockerfiles are unchanged.
    cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
    ctr=$($buildah from scratch)
    $buildah copy "$ctr" "$work/rootfs" / >/dev/null
    $buildah config --cmd /bin/bash --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$ctr"
    $buildah commit --rm "$ctr" "$base" >/dev/null
fi

torch_args=""
if [ -n "${TORCH_WHEEL_DIR:-}" ]; then
    # a PEP 503 "simple" index of one project: http.server's directory listing of torch/ is one
    mkdir -p "$work/index/torch"
    ln -sf "$TORCH_WHEEL_DIR"/torch-2.13.0+cpu-*.whl "$work/index/torch/"
    port=${INDEX_PORT:-18765}
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/index" >"$work/index.log" 2>&1 &
    index_pid=$!
    trap 'kill $index_pid' EXIT
    sleep 1
    torch_args="--build-arg TORCH_INDEX_URL=http://127.0.0.1:$port/"
fi

for t in $targets; do
    echo "== edgefleet-$t"
    # shellcheck disable=SC2086 # word splitting of torch_args is intended
    $buildah bud --isolation chroot --format docker --layers -f "$repo/deploy/containers/Dockerfile.$t" \
        $torch_args -t "localhost/edgefleet-$t:standin" "$repo"
done
$buildah images
