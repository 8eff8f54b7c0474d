#!/usr/bin/env bash
# Compatibility step for .ci/run (issue 8). Call it after `bash scripts/test.sh`, which already
# runs the live matrix, the golden streams and the schema equality test (tests/compat/).
# This step adds:
#   1. `ferry-dump check-compat` of every committed schema against this build's schema, so a
#      break is reported by kind (new subsection, changed written version, raised minimum, ...);
#   2. the cross-build check against the previous release, when there is one: the newest tag
#      matching v* (or a commit SHA in compat/baseline, which wins). None yet: skipped.
# Time budget: step 1 ~10 s once tools is built; step 2 <= 8 min on 2 cores (cold debug build of
# the baseline ~4-6 min, then ~10 s of migrations per machine type), see compat/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p tools --bin ferry-dump
dump="$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/ferry-dump"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for f in compat/schemas/*.json; do
  m=$(basename "$f" .json)
  if ! "$dump" schema --machine "$m" >"$tmp/$m.json" 2>"$tmp/$m.err"; then
    echo "compat: machine type $m has a committed schema but this build does not offer it:" >&2
    cat "$tmp/$m.err" >&2
    fail=1
    continue
  fi
  if "$dump" check-compat "$f" "$tmp/$m.json" >"$tmp/$m.out" 2>&1; then
    echo "compat: $m: committed schema and this build agree"
  else
    echo "compat: $m: this build breaks the frozen schema $f:" >&2
    cat "$tmp/$m.out" >&2
    fail=1
  fi
done
[ "$fail" = 0 ] || exit 1

baseline=""
if [ -s compat/baseline ]; then
  baseline=$(tr -d '[:space:]' <compat/baseline)
elif tag=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null); then
  baseline=$tag
fi
if [ -z "$baseline" ]; then
  echo "compat: no previous release (no v* tag, no compat/baseline): cross-build check skipped"
  exit 0
fi
if [ "$(git rev-parse "$baseline^{commit}" 2>/dev/null)" = "$(git rev-parse HEAD)" ]; then
  echo "compat: the previous release $baseline is this commit: cross-build check skipped"
  exit 0
fi
echo "compat: cross-build check against $baseline"
bash compat/cross-build.sh "$baseline"
