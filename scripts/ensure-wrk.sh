#!/usr/bin/env bash
# Make sure the HTTP load generator wrk is installed (Debian's package), for `make bench-http`.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
echo "wrk is not installed: installing it with apt-get" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
