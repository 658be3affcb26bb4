#!/usr/bin/env bash
# Builds the sipwarden image with buildah: `scripts/build-image.sh [release|debug] [tag]`.
# Stages the binaries of that cargo profile (stripped) with the libraries they link and a
# non-root user, then runs `buildah bud` on docker/Dockerfile. Needs buildah and runc
# (apt-get install buildah podman runc catatonit); no network is used.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
tag="${2:-localhost/sipwarden:dev}"
bins=(sipwarden-edge sipwarden-controller sipwardenctl)

if [ "$profile" = release ]; then
  cargo build --release --locked --bins
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/etc" "$ctx/data"
for b in "${bins[@]}"; do
  strip -o "$ctx/bin/$b" "target/$profile/$b"
done
# The shared libraries the binaries link, at the same absolute paths (the loader included).
for lib in $(ldd "${bins[@]/#/target/$profile/}" | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
  mkdir -p "$ctx/lib$(dirname "$lib")"
  cp -L "$lib" "$ctx/lib$lib"
done
printf 'root:x:0:0:root:/:/nonexistent\nsipwarden:x:65532:65532:sipwarden:/data:/nonexistent\n' > "$ctx/etc/passwd"
printf 'root:x:0:\nsipwarden:x:65532:\n' > "$ctx/etc/group"

# buildah here needs runc and bounded ulimits (docker/containers.conf).
CONTAINERS_CONF="$PWD/docker/containers.conf" buildah bud --quiet --network none --layers=false \
  -f docker/Dockerfile -t "$tag" "$ctx" >/dev/null
echo "$tag"
