#!/usr/bin/env bash
# Make sure a Python >= 3.11 with venv and pip exists; install Debian's when it does not (run as root).
set -euo pipefail
python=${1:-python3}
if "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "installing python3 and python3-venv with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
  exit 0
fi
echo "inferq needs Python >= 3.11 with the venv module; install it and retry" >&2
exit 1
