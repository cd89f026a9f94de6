#!/usr/bin/env bash
# Install everything the test suite needs, then run it:  bash tests/run.sh [pytest args…]
#
#   1. a virtualenv in .venv with voxbridge and its test extras
#   2. (as root) debootstrap, and the Debian sid chroot with Asterisk 22 for the e2e tests,
#      cached outside the repo in ${VOXBRIDGE_SANDBOX_DIR:-~/.cache/voxbridge}
#   3. pytest over tests/ (unit, integration, e2e)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing voxbridge with test extras"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast]'

if [ "$(id -u)" = 0 ] && [ -z "${VOXBRIDGE_SKIP_E2E:-}" ]; then
  echo "==> preparing the real-Asterisk sandbox (cached after the first run)"
  bash tests/e2e/sandbox.sh asterisk
else
  echo "==> not root (or VOXBRIDGE_SKIP_E2E set): e2e tests will be skipped unless the sandbox exists"
fi

echo "==> running the tests"
exec .venv/bin/python -m pytest "$@"
