#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian/Ubuntu package `prometheus`) for tests/test_observability.py.
# Idempotent and quiet: does nothing when both are already on PATH.
#
# The package's maintainer scripts try to start its service. Machines without systemd (containers,
# CI) cannot, and the tests start their own Prometheus anyway, so the install runs with a
# policy-rc.d that refuses every service start; an existing policy-rc.d is left as it was.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-prometheus: no apt-get here; install Prometheus 2.x so that \`prometheus\` and \`promtool\` are on PATH" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-prometheus: needs root or sudo to run apt-get" >&2; exit 1; }
  SUDO=(sudo)
fi

POLICY=/usr/sbin/policy-rc.d
created_policy=0
cleanup() { if [ "$created_policy" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  created_policy=1
fi

echo "install-prometheus: installing prometheus (apt-get)"
log=$(mktemp)
if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
       && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
     >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  echo "install-prometheus: apt-get failed (output above)" >&2
  exit 1
fi
rm -f "$log"
for tool in prometheus promtool; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-prometheus: $tool is still not on PATH after the install" >&2; exit 1; }
done
echo "install-prometheus: $(prometheus --version 2>&1 | head -n 1)"
