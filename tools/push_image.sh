#!/usr/bin/env bash
# `make image-push`: push the image `make image` built to a registry, once per tag.
#
#   IMAGE_REPO=ghcr.io/<owner>/fuseline-worker IMAGE_TAGS="sha-0123abcd main" make image-push
#
# Without IMAGE_TAGS, in GitHub Actions (GITHUB_SHA set): `sha-<12 hex of the commit>`, the release channel
# (RELEASE_CHANNEL, default main) and, on a tag push, the git tag.
#
# Reads which image and which buildah storage from build/fuseline-worker.json (written by `make image`).
# REGISTRY_USER / REGISTRY_PASSWORD, when set, log in first (the password is read from stdin, never put on
# a command line). REGISTRY_TLS_VERIFY=false allows a plain-HTTP registry (tests use a local one).
# Writes build/pushed.json: each pushed reference with the manifest digest the registry stored.
set -euo pipefail
cd "$(dirname "$0")/.."

INFO=build/fuseline-worker.json
[[ -f "$INFO" ]] || { echo "make image-push: $INFO not found: run \`make image\` first" >&2; exit 2; }
: "${IMAGE_REPO:?make image-push: set IMAGE_REPO, e.g. ghcr.io/<owner>/fuseline-worker}"
if [[ -z "${IMAGE_TAGS:-}" && -n "${GITHUB_SHA:-}" ]]; then
  IMAGE_TAGS="sha-${GITHUB_SHA:0:12} ${RELEASE_CHANNEL:-main}"
  [[ "${GITHUB_REF_TYPE:-}" == tag ]] && IMAGE_TAGS="$IMAGE_TAGS ${GITHUB_REF_NAME}"
fi
: "${IMAGE_TAGS:?make image-push: set IMAGE_TAGS, e.g. \"sha-0123abcd main\"}"
read -r built driver < <(python3 -c 'import json,sys; i=json.load(open(sys.argv[1])); print(i["image"], i["storage_driver"])' "$INFO")
image=${IMAGE:-$built}  # IMAGE: push another image of the same storage (the tests push the small base)
BUILDAH=(buildah --storage-driver "$driver")
tls=(--tls-verify="${REGISTRY_TLS_VERIFY:-true}")
registry=${IMAGE_REPO%%/*}

if [[ -n "${REGISTRY_USER:-}" ]]; then
  : "${REGISTRY_PASSWORD:?make image-push: REGISTRY_USER is set but REGISTRY_PASSWORD is not}"
  printf '%s' "$REGISTRY_PASSWORD" | "${BUILDAH[@]}" login "${tls[@]}" -u "$REGISTRY_USER" --password-stdin "$registry"
fi

pushed=()
for tag in $IMAGE_TAGS; do
  [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "make image-push: '$tag' is not a valid image tag" >&2; exit 2; }
  digest_file=$(mktemp)
  echo "make image-push: $image -> $IMAGE_REPO:$tag"
  "${BUILDAH[@]}" push --quiet "${tls[@]}" --digestfile "$digest_file" "$image" "docker://$IMAGE_REPO:$tag"
  pushed+=("$IMAGE_REPO:$tag@$(cat "$digest_file")")
  rm -f "$digest_file"
done
python3 -c 'import json,sys; print(json.dumps({"pushed": sys.argv[1:]}, indent=2))' "${pushed[@]}" | tee build/pushed.json
