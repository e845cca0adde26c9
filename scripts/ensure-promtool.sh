#!/usr/bin/env bash
# Make sure `promtool` (Prometheus' rule checker and rule unit-test runner) is on PATH: the alert rules'
# tests run it. Debian ships it in the prometheus package; nothing is started, only the tool is needed.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
echo "promtool is not installed: installing prometheus with apt-get" >&2
apt-get update -qq
# NOTE: policy-rc.d exit 101 keeps the package's postinst from starting a Prometheus server on :9090
# (the tests need the tool, not a daemon that would hold the port).
policy=/usr/sbin/policy-rc.d
created_policy=false
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=true
fi
trap 'if $created_policy; then rm -f "$policy"; fi' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null 2>&1 || { echo "promtool is still missing after installing prometheus" >&2; exit 1; }
