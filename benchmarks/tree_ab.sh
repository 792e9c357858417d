#!/usr/bin/env bash
# Batch-1 decode step of older commits beside the working tree's on one GPU lease (leases differ by up to
# 0.15 ms, so code is compared within one call). Each tree gets its own model load (`decode_variants.py`).
#   bash benchmarks/tree_ab.sh prepare COMMIT...   # here, with git: old_trees/COMMIT/{src,benchmarks} (ignored)
#   bash benchmarks/tree_ab.sh run COMMIT... [-- VARIANT...]   # on the GPU, old_trees carried: each COMMIT's
#       default, then the working tree's default and VARIANTs (decode_variants.py arguments), then the first
#       COMMIT again; results in $OUT/tree_ab/<name>/decode_variants.json, step medians on stdout
set -uo pipefail
mode=${1:?prepare or run}; shift
commits=(); variants=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; variants=("$@"); break; fi
  commits+=("$1"); shift
done
if [ "$mode" = prepare ]; then
  for c in "${commits[@]}"; do
    rm -rf "old_trees/$c" && mkdir -p "old_trees/$c" && git archive "$c" src benchmarks | tar -x -C "old_trees/$c"
  done
  du -sh old_trees; exit 0
fi
[ "$mode" = run ] || { echo "tree_ab.sh: unknown mode $mode (prepare or run)" >&2; exit 2; }
OUT=${OUT:-out}; export PYTHONUNBUFFERED=1 MODEL=${MODEL:-llama-4-scout}
one() {  # $1: a tree root, $2: a name, then decode_variants.py arguments
  local root=$1 name=$2; shift 2
  mkdir -p "$OUT/tree_ab/$name"; echo "== $name"
  OUT="$OUT/tree_ab/$name" PYTHONPATH="$root/src" timeout 300 python3 "$root/benchmarks/decode_variants.py" "$@" \
      2>&1 | grep -E '"variant"|Error'
}
for c in "${commits[@]}"; do one "old_trees/$c" "$c" default; done
one . working-tree default "${variants[@]}"
[ ${#commits[@]} -gt 0 ] && one "old_trees/${commits[0]}" "${commits[0]}-again" default
exit 0
