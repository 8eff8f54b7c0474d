#!/usr/bin/env bash
# Ferry's test command: sets up what the tests need on a fresh machine, then runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python venv with the real QMP client (qemu.qmp from PyPI), used by the QMP tests.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check qemu.qmp
fi
export FERRY_PYTHON="$PWD/.venv/bin/python"

if [ ! -e /dev/kvm ]; then
  echo "warning: /dev/kvm is missing; the KVM tests will fail (they never skip)" >&2
fi

profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
cargo test --workspace --doc
