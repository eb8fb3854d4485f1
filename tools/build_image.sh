#!/usr/bin/env bash
# `make image`: build the worker image from the repo's Dockerfile with buildah and write it as an OCI archive.
#
# The base image is a build argument. Where it cannot be pulled (no registry access, as on fuseline's own
# build machines) a local stand-in is built from Debian packages first (debootstrap: Debian 12 + its
# python3 3.11, as in python:3.11-slim-bookworm) and passed in its place; nothing else differs between the
# two builds. Writes build/fuseline-worker.oci.tar and build/fuseline-worker.json (what was built, from
# which base, sizes and timings), and leaves the image tagged $IMAGE in buildah's local storage.
#
# Environment: BASE_IMAGE, IMAGE, STANDIN=1 (use the stand-in without trying to pull), DEBIAN_MIRROR,
# PIP_CA (a CA bundle for pip behind a TLS-intercepting proxy; default: the system bundle if present),
# STORAGE_DRIVER (buildah's: overlay by default, vfs where the kernel has no overlay support; the choice is
# recorded in build/fuseline-worker.json, and `make image-smoke` uses the same storage).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}
IMAGE=${IMAGE:-localhost/fuseline-worker:dev}
ARCHIVE=build/fuseline-worker.oci.tar
INFO=build/fuseline-worker.json
STANDIN_IMAGE=localhost/fuseline-standin/python:3.11-slim-bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PIP_CA=${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
# overlay stores each layer once; vfs (no kernel support needed) copies the whole tree per layer and per
# container: measured here, a 5.6 GB image took about 40 s per layer and per `buildah from` with vfs.
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")

command -v buildah >/dev/null || { echo "make image: buildah is not installed (Debian/Ubuntu: apt-get install buildah debootstrap)" >&2; exit 2; }
mkdir -p build
now() { date +%s.%N; }
started=$(now)

build_standin() {
  # Debian 12 minbase with the packages python:3.11-slim-bookworm carries at run time.
  if "${BUILDAH[@]}" inspect --type image "$STANDIN_IMAGE" >/dev/null 2>&1; then
    echo "make image: using the existing stand-in base $STANDIN_IMAGE"
    return
  fi
  command -v debootstrap >/dev/null || { echo "make image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
  local root
  root=$(mktemp -d /var/tmp/fuseline-standin.XXXXXX)
  trap 'rm -rf "$root"' RETURN
  echo "make image: building the stand-in base $STANDIN_IMAGE with debootstrap (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata \
    bookworm "$root" "$DEBIAN_MIRROR" >build/standin-debootstrap.log 2>&1 \
    || { tail -20 build/standin-debootstrap.log >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  local ctr
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy --quiet "$ctr" "$root"/ / >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' \
    --label org.opencontainers.image.description="fuseline stand-in for python:3.11-slim-bookworm" "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$STANDIN_IMAGE" >/dev/null
}

base="$BASE_IMAGE"
standin=false
if [[ "${STANDIN:-0}" == 1 ]] || ! "${BUILDAH[@]}" pull --quiet "$BASE_IMAGE" >/dev/null 2>build/base-pull.log; then
  [[ "${STANDIN:-0}" == 1 ]] || echo "make image: cannot pull $BASE_IMAGE ($(tail -1 build/base-pull.log | cut -c1-160))"
  build_standin
  base="$STANDIN_IMAGE"
  standin=true
fi
based=$(now)

secret=()
[[ -s "$PIP_CA" ]] && secret=(--secret "id=pip-ca,src=$PIP_CA")
echo "make image: building $IMAGE from $base"
"${BUILDAH[@]}" bud --isolation chroot --layers --build-arg "BASE_IMAGE=$base" "${secret[@]}" \
  -f Dockerfile -t "$IMAGE" .
built=$(now)

rm -f "$ARCHIVE"
"${BUILDAH[@]}" push --quiet "$IMAGE" "oci-archive:$ARCHIVE:$IMAGE"
pushed=$(now)

# Installed bytes: the files of the image's root filesystem (what a host unpacks), and of the base's.
installed_bytes() {
  local ctr mnt size
  ctr=$("${BUILDAH[@]}" from --pull-never --quiet "$1")
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  size=$(du -sb --apparent-size "$mnt" | cut -f1)
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  echo "$size"
}
image_size=$(installed_bytes "$IMAGE")
base_size=$(installed_bytes "$base")
archive_size=$(stat -c %s "$ARCHIVE")
python3 - "$INFO" <<EOF
import json, sys
info = {
    "image": "$IMAGE",
    "storage_driver": "$STORAGE_DRIVER",
    "base_image": "$BASE_IMAGE",
    "built_from": "$base",
    "standin_base": $( [[ $standin == true ]] && echo True || echo False ),
    "image_bytes_installed": $image_size,
    "base_bytes_installed": $base_size,
    "archive": "$ARCHIVE",
    "archive_bytes_compressed": $archive_size,
    "seconds": {"base": round($based - $started, 1), "build": round($built - $based, 1),
                "archive": round($pushed - $built, 1)},
}
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
print(json.dumps(info, indent=2))
EOF
