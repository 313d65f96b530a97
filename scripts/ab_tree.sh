#!/usr/bin/env bash
# Exports commit REV's tree into .ab/REV (ignored by git) so that one device call can build and time an
# older tree next to the working tree: pass `carry: [".ab/REV"]` to the device tool and run
# `scripts/gpu_plan.sh comm-ab REV` there (issue 7: session 9 measured the W=2 hook pipeline at 57 us,
# session 10 at 65 us on the same kernel code; building both in one call separates code from machine).
#   scripts/ab_tree.sh 19199c1
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: scripts/ab_tree.sh REV}"
dest=".ab/$rev"
rm -rf "$dest"
mkdir -p "$dest"
git archive "$rev" | tar -x -C "$dest"
echo "$dest: $(du -sh "$dest" | cut -f1) (tree of $(git rev-parse --short "$rev"))"
