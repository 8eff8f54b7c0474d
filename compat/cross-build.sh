#!/usr/bin/env bash
# Cross-build compatibility check (issue 8):
#   compat/cross-build.sh OLD_COMMIT [NEW_COMMIT]
# builds `ferry` of OLD_COMMIT (and of NEW_COMMIT; default: this working tree) in separate git
# worktrees with separate target directories, then migrates live over loopback TCP in both
# directions (old -> new, new -> old) for every machine type both builds offer, with a CPU
# core and a multifunction PCI slot hot-plugged and an unplug pending across the migration
# (compat/cross_migrate.py, driven with the qemu.qmp client from .venv).
#
# Time budget on 2 cores: <= 8 min cold (a debug build of one commit ~4-6 min, of both ~10 min
# when NEW_COMMIT is given too), then ~5 s per machine type and direction. Builds are cached
# in $FERRY_CROSS_DIR (default target/cross-build/), so a rerun only migrates.
# Exit status: 0 all migrations ok, 1 a migration failed, 2 usage or build error.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: compat/cross-build.sh OLD_COMMIT [NEW_COMMIT]" >&2
  exit 2
fi
work=${FERRY_CROSS_DIR:-$root/target/cross-build}
mkdir -p "$work"
start=$(date +%s)

# Build `ferry` at COMMIT; prints the binary's path.
build() {
  local rev=$1 sha wt
  sha=$(git rev-parse --verify --quiet "$rev^{commit}") || { echo "cross-build: unknown commit $rev" >&2; exit 2; }
  wt="$work/src-$sha"
  if [ ! -x "$work/target-$sha/debug/ferry" ]; then
    if [ ! -d "$wt" ]; then
      git worktree add --detach --quiet "$wt" "$sha" >&2
    fi
    echo "cross-build: building $rev ($sha) in $wt" >&2
    (cd "$wt" && CARGO_TARGET_DIR="$work/target-$sha" cargo build -q -p vmm --bin ferry) >&2 \
      || { echo "cross-build: cannot build $rev" >&2; exit 2; }
    git worktree remove --force "$wt" >&2 || true
  fi
  echo "$work/target-$sha/debug/ferry"
}

old=$(build "$1")
if [ $# -eq 2 ]; then
  new=$(build "$2")
  newname=$2
else
  echo "cross-build: building this working tree" >&2
  cargo build -q -p vmm --bin ferry
  new="$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/ferry"
  newname="working tree"
fi
echo "cross-build: builds ready after $(( $(date +%s) - start )) s"

# The QMP client: the repo's .venv with qemu.qmp (scripts/test.sh creates it).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check qemu.qmp
fi
status=0
.venv/bin/python compat/cross_migrate.py --old "$old" --old-name "$1" --new "$new" --new-name "$newname" || status=$?
echo "cross-build: done in $(( $(date +%s) - start )) s"
exit $status
