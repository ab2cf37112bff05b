#!/usr/bin/env bash
# Source trees for perf/scratch/ab_launches.py: perf/scratch/trees/NAME holds tq_ops/ and perf/ of
# each git revision given (a branch, a commit); run on this machine before a device call (the
# trees travel with the working tree as untracked files).  Delete them after.
#   bash perf/scratch/make_trees.sh main my-branch
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel)
for rev in "$@"; do
    dir="$here/trees/${rev//\//_}"
    rm -rf "$dir" && mkdir -p "$dir"
    git -C "$root" archive "$rev" tq_ops perf ':(exclude)perf/results' | tar -x -C "$dir"
    echo "$dir"
done
