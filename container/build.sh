#!/usr/bin/env bash
# Build the production image from the repository's Dockerfile:  make image [IMAGE=...] [BASE_IMAGE=...]
#
# The engine is Docker when a daemon answers, else podman (with container/containers.conf unless
# CONTAINERS_CONF names another file). BASE_IMAGE defaults to the Dockerfile's PyTorch base; on a
# machine that reaches no container registry, a local Debian base is built first (debootstrap)
# and used instead. The machine's CA bundle reaches pip as a build secret, so a build behind a
# TLS-intercepting proxy works and the image never contains the proxy's certificate.
# Prints the image's tag, size and build time; removes the images earlier builds left untagged.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/erw:dev}
CA_BUNDLE=${CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
LOCAL_BASE=localhost/erw-base:bookworm

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=(docker)
  build_flags=()
else
  command -v podman >/dev/null || { echo "make image: neither a Docker daemon nor podman: apt-get install -y podman buildah runc debootstrap" >&2; exit 2; }
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/container/containers.conf}
  engine=(podman)
  # chroot isolation: no user namespaces or nested cgroups needed inside the sandbox.
  build_flags=(--isolation chroot --network host)
fi

registry_reachable() {  # Docker Hub answers /v2/ with 401 when it can be reached at all.
  local code
  code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' https://registry-1.docker.io/v2/ || true)
  [ "$code" = 401 ] || [ "$code" = 200 ]
}

build_local_base() {
  if "${engine[@]}" image exists "$LOCAL_BASE" 2>/dev/null; then return; fi
  command -v debootstrap >/dev/null || { echo "make image: no registry and no debootstrap: apt-get install -y debootstrap" >&2; exit 2; }
  local rootfs
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' RETURN
  echo "make image: no container registry reachable: building $LOCAL_BASE with debootstrap"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | "${engine[@]}" import - localhost/erw-debootstrap:bookworm >/dev/null
  "${engine[@]}" build "${build_flags[@]}" -q -t "$LOCAL_BASE" -f container/base.Containerfile container >/dev/null
  "${engine[@]}" rmi localhost/erw-debootstrap:bookworm >/dev/null
}

base_args=()
if [ -n "${BASE_IMAGE:-}" ]; then
  base_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
elif ! registry_reachable; then
  build_local_base
  base_args=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
fi

secret_args=()
[ -s "$CA_BUNDLE" ] && secret_args=(--secret "id=pip_ca,src=$CA_BUNDLE")

start=$(date +%s)
"${engine[@]}" build "${build_flags[@]}" "${base_args[@]}" "${secret_args[@]}" -t "$IMAGE" .
seconds=$(( $(date +%s) - start ))
"${engine[@]}" image prune -f >/dev/null  # earlier builds of this tag, now untagged
size=$("${engine[@]}" image inspect --format '{{.Size}}' "$IMAGE")
awk -v image="$IMAGE" -v size="$size" -v s="$seconds" \
  'BEGIN { printf "image %s  size %.1f GB  built in %d min %02d s\n", image, size / 1e9, s / 60, s % 60 }'
